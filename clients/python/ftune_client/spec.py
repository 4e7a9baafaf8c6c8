"""Job specs from a dict or a YAML file, with the keys of `ftune submit`.

The keys are JobSpec's field names (proto/ftune/v1/job.proto), which follow
HF TrainingArguments, PEFT LoraConfig and BitsAndBytesConfig. The walk goes
by the message descriptors, as the C++ reader (proto/jobspec_yaml.cc) does,
and accepts the same few spellings that are not plain fields:

    model: PATH                        model.model_name_or_path
    resources.min_gpu_memory: 40GiB    resources.min_gpu_memory_bytes
    training.max_seq_length / max_length   training.max_seq_len (TRL's names)
    training.max_steps: -1             unset (HF: train for num_train_epochs)
    lora.target_modules: all-linear    every projection
    a single string for a list         a list of one

Defaults and validation are the coordinator's (CreateJob resolves the spec
exactly as the CLI does); what this module reports is what it cannot even
put into a JobSpec: unknown keys and values of the wrong type, every one
named by its key path.
"""

import math
import os

from ftune.v1 import job_pb2

KNOWN_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
    "ki": 1024.0, "kib": 1024.0, "mi": 1024.0 ** 2, "mib": 1024.0 ** 2,
    "gi": 1024.0 ** 3, "gib": 1024.0 ** 3, "ti": 1024.0 ** 4, "tib": 1024.0 ** 4,
}


class SpecError(ValueError):
    """A spec that cannot be read; `problems` lists each, with its key path."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("invalid job spec:\n  " + "\n  ".join(self.problems))


def parse_byte_size(value):
    """'40GiB', '80 GB', '512MiB', 1073741824 -> bytes; None if not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    text = "".join(str(value).split())
    i = 0
    while i < len(text) and (text[i].isdigit() or text[i] == "."):
        i += 1
    unit = text[i:].lower()
    if i == 0 or unit not in _SIZE_UNITS:
        return None
    try:
        v = float(text[:i]) * _SIZE_UNITS[unit]
    except ValueError:
        return None
    return int(round(v)) if 0 <= v <= 9.0e18 else None


def _text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_bool(value):
    if isinstance(value, bool):
        return value
    lowered = _text(value).lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    raise ValueError("expected true or false, got '%s'" % _text(value))


def _as_int(value):
    if isinstance(value, bool):
        raise ValueError("expected an integer, got '%s'" % _text(value))
    if isinstance(value, int):
        return value
    try:
        v = float(value)  # PyYAML reads 1e3 as text: accept integral numbers
    except (TypeError, ValueError):
        raise ValueError("expected an integer, got '%s'" % _text(value)) from None
    if not math.isfinite(v) or v != math.floor(v) or abs(v) > 9.0e18:
        raise ValueError("expected an integer, got '%s'" % _text(value))
    return int(v)


def _as_float(value):
    if isinstance(value, bool):
        raise ValueError("expected a number, got '%s'" % _text(value))
    try:
        return float(value)  # PyYAML reads 2e-4 (no dot) as text
    except (TypeError, ValueError):
        raise ValueError("expected a number, got '%s'" % _text(value)) from None


class _Reader:
    def __init__(self):
        self.errors = []

    def message(self, value, path, msg):
        if not isinstance(value, dict):
            self.errors.append("%s: expected a mapping of keys, got '%s'"
                               % (path or "job spec", value))
            return
        descriptor = msg.DESCRIPTOR
        for key, item in value.items():
            key = str(key)
            key_path = key if not path else path + "." + key
            if self._special(descriptor.full_name, key, item, key_path, msg):
                continue
            field = descriptor.fields_by_name.get(key)
            if field is None:
                hint = _section_of(key)
                if hint and hint != key_path:
                    self.errors.append("%s: unknown key; did you mean '%s'?" % (key_path, hint))
                else:
                    self.errors.append("%s: unknown key; known keys here: %s"
                                       % (key_path, ", ".join(f.name for f in descriptor.fields)))
                continue
            self.field(item, key_path, field, msg)

    def _special(self, type_name, key, value, path, msg):
        if type_name == "ftune.v1.ResourceSpec" and key == "min_gpu_memory":
            size = parse_byte_size(value)
            if size is None:
                self.errors.append("%s: expected a size such as 40GiB or 80GB, got '%s'"
                                   % (path, value))
            else:
                msg.min_gpu_memory_bytes = size
            return True
        if type_name == "ftune.v1.TrainingSpec" and key in ("max_seq_length", "max_length"):
            self.field(value, path, msg.DESCRIPTOR.fields_by_name["max_seq_len"], msg)
            return True
        if type_name == "ftune.v1.TrainingSpec" and key == "max_steps":
            try:
                if _as_int(value) == -1:
                    msg.max_steps = 0
                    return True
            except ValueError:
                pass
            return False
        if type_name == "ftune.v1.JobSpec" and key == "model" and isinstance(value, str):
            msg.model.model_name_or_path = value
            return True
        if type_name == "ftune.v1.LoraSpec" and key == "target_modules" and isinstance(value, str):
            del msg.target_modules[:]
            msg.target_modules.extend(KNOWN_LORA_TARGETS if value == "all-linear" else [value])
            return True
        return False

    def field(self, value, path, field, msg):
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                self.errors.append("%s: expected a mapping, got '%s'" % (path, value))
                return
            target = getattr(msg, field.name)
            for k, v in value.items():
                if isinstance(v, (dict, list)):
                    self.errors.append("%s.%s: expected a string, got '%s'" % (path, k, v))
                else:
                    target[str(k)] = _text(v)
            return
        if field.label == field.LABEL_REPEATED:
            items = value if isinstance(value, list) else [value]
            if isinstance(value, dict):
                self.errors.append("%s: expected a list, got '%s'" % (path, value))
                return
            target = getattr(msg, field.name)
            for i, item in enumerate(items):
                if isinstance(item, (dict, list)):
                    self.errors.append("%s[%d]: expected a string, got '%s'" % (path, i, item))
                else:
                    target.append(_text(item))
            return
        if field.message_type is not None:
            if value is not None:
                self.message(value, path, getattr(msg, field.name))
            return
        if isinstance(value, (dict, list)):
            self.errors.append("%s: expected a single value, got '%s'" % (path, value))
            return
        try:
            if field.type == field.TYPE_BOOL:
                setattr(msg, field.name, _as_bool(value))
            elif field.type in (field.TYPE_INT32, field.TYPE_INT64, field.TYPE_UINT64):
                v = _as_int(value)
                if field.type == field.TYPE_INT32 and not -2**31 <= v < 2**31:
                    raise ValueError("expected an integer, got '%s'" % _text(value))
                if field.type == field.TYPE_UINT64 and v < 0:
                    raise ValueError("expected an integer >= 0, got '%s'" % _text(value))
                setattr(msg, field.name, v)
            elif field.type == field.TYPE_DOUBLE:
                setattr(msg, field.name, _as_float(value))
            elif field.type == field.TYPE_STRING:
                setattr(msg, field.name, _text(value))
            else:
                raise ValueError("unsupported field type")
        except ValueError as e:
            self.errors.append("%s: %s" % (path, e))


def _section_of(key):
    """Which section of JobSpec has a field named `key`, for 'did you mean'."""
    root = job_pb2.JobSpec.DESCRIPTOR
    for f in root.fields:
        if f.message_type is None or f.message_type.GetOptions().map_entry:
            continue
        if key in f.message_type.fields_by_name:
            return f.name + "." + key
    return key if key in root.fields_by_name else ""


def make_paths_absolute(spec, base_dir):
    """Relative model, data and output paths against `base_dir`, as the CLI
    does against the directory it runs in: ranks run elsewhere."""
    def fix(path):
        if not path or path.startswith("/") or not base_dir:
            return path
        while path.startswith("./"):
            path = path[2:]
        return os.path.join(base_dir, path)

    spec.model.model_name_or_path = fix(spec.model.model_name_or_path)
    for files in (spec.dataset.data_files, spec.dataset.eval_data_files):
        fixed = [fix(f) for f in files]
        del files[:]
        files.extend(fixed)
    if spec.output_dir:
        spec.output_dir = fix(spec.output_dir)


def job_spec(spec, base_dir=None):
    """A JobSpec from a dict with the CLI's YAML keys, a path to a YAML file,
    or a JobSpec (copied). Relative paths are made absolute against base_dir
    (default: the current directory). Raises SpecError listing every key
    that cannot be read."""
    if isinstance(spec, job_pb2.JobSpec):
        out = job_pb2.JobSpec()
        out.CopyFrom(spec)
    else:
        if isinstance(spec, (str, os.PathLike)):
            import yaml  # only needed for files

            path = os.fspath(spec)
            try:
                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f)
            except OSError as e:
                raise SpecError(["%s: cannot read: %s" % (path, e.strerror)]) from None
            except yaml.YAMLError as e:
                raise SpecError(["%s: not valid YAML: %s" % (path, e)]) from None
            if data is None:
                raise SpecError(["%s: job spec is empty" % path])
        else:
            data = spec
        reader = _Reader()
        out = job_pb2.JobSpec()
        reader.message(data, "", out)
        if reader.errors:
            raise SpecError(reader.errors)
    make_paths_absolute(out, os.getcwd() if base_dir is None else base_dir)
    return out
