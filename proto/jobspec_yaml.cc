// YAML <-> JobSpec through protobuf reflection: a YAML key is the proto field
// name, so the mapping cannot drift from the contract. The few keys that are
// not plain fields (sizes written as "40GiB", TRL's max_seq_length spelling,
// a model given as a bare path) are handled before the generic walk.
#include <cctype>
#include <cmath>
#include <fstream>
#include <sstream>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>
#include <yaml-cpp/yaml.h>

#include "jobspec.h"

namespace ftune {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

std::string Join(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

std::string Show(const YAML::Node& node) {
  if (node.IsScalar()) return node.Scalar();
  YAML::Emitter out;
  out << YAML::Flow << node;
  return out.c_str();
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool ParseBool(const std::string& s, bool* out) {
  const std::string l = Lower(s);
  if (l == "true" || l == "yes" || l == "on") { *out = true; return true; }
  if (l == "false" || l == "no" || l == "off") { *out = false; return true; }
  return false;
}

bool ParseInt(const std::string& s, int64_t* out) {
  if (s.empty()) return false;
  size_t pos = 0;
  try {
    long long v = std::stoll(s, &pos, 10);
    if (pos != s.size()) {
      // Accept integral floats such as "1e3".
      double d = std::stod(s, &pos);
      if (pos != s.size() || d != std::floor(d) || std::fabs(d) > 9.0e18) return false;
      v = static_cast<long long>(d);
    }
    *out = v;
    return true;
  } catch (...) {
    try {
      double d = std::stod(s, &pos);
      if (pos != s.size() || d != std::floor(d) || std::fabs(d) > 9.0e18) return false;
      *out = static_cast<int64_t>(d);
      return true;
    } catch (...) {
      return false;
    }
  }
}

bool ParseDouble(const std::string& s, double* out) {
  if (s.empty()) return false;
  size_t pos = 0;
  try {
    double v = std::stod(s, &pos);
    if (pos != s.size()) return false;
    *out = v;
    return true;
  } catch (...) {
    return false;
  }
}

// Finds which section of JobSpec has a field named `key`, for "did you mean".
std::string SectionOf(const std::string& key) {
  const Descriptor* root = v1::JobSpec::descriptor();
  for (int i = 0; i < root->field_count(); ++i) {
    const FieldDescriptor* f = root->field(i);
    if (f->type() != FieldDescriptor::TYPE_MESSAGE || f->is_map()) continue;
    if (f->message_type()->FindFieldByName(key) != nullptr) return f->name() + "." + key;
  }
  if (root->FindFieldByName(key) != nullptr) return key;
  return "";
}

class YamlReader {
 public:
  explicit YamlReader(std::vector<std::string>* errors) : errors_(errors) {}

  void ReadMessage(const YAML::Node& node, const std::string& path, Message* msg) {
    if (!node.IsMap()) {
      Error(path.empty() ? std::string("job spec") : path,
            "expected a mapping of keys, got '" + Show(node) + "'");
      return;
    }
    const Descriptor* d = msg->GetDescriptor();
    for (const auto& kv : node) {
      const std::string key = kv.first.as<std::string>();
      const std::string key_path = Join(path, key);
      if (Special(key, kv.second, key_path, msg)) continue;
      const FieldDescriptor* f = d->FindFieldByName(key);
      if (f == nullptr) {
        std::string hint = SectionOf(key);
        std::string msg_text = "unknown key";
        if (!hint.empty() && hint != key_path) msg_text += "; did you mean '" + hint + "'?";
        else msg_text += "; known keys here: " + KnownKeys(d);
        Error(key_path, msg_text);
        continue;
      }
      ReadField(kv.second, key_path, f, msg);
    }
  }

 private:
  void Error(const std::string& path, const std::string& text) {
    errors_->push_back(path + ": " + text);
  }

  static std::string KnownKeys(const Descriptor* d) {
    std::string out;
    for (int i = 0; i < d->field_count(); ++i) {
      if (!out.empty()) out += ", ";
      out += d->field(i)->name();
    }
    return out;
  }

  // Keys that are not a plain field of the message they appear in.
  bool Special(const std::string& key, const YAML::Node& value, const std::string& path,
               Message* msg) {
    const std::string& type = msg->GetDescriptor()->full_name();
    if (type == "ftune.v1.ResourceSpec" && key == "min_gpu_memory") {
      int64_t bytes = 0;
      if (!value.IsScalar() || !ParseByteSize(value.Scalar(), &bytes)) {
        Error(path, "expected a size such as 40GiB or 80GB, got '" + Show(value) + "'");
      } else {
        static_cast<v1::ResourceSpec*>(msg)->set_min_gpu_memory_bytes(bytes);
      }
      return true;
    }
    if (type == "ftune.v1.FsdpSpec" && key == "device_memory_limit") {
      int64_t bytes = 0;
      if (!value.IsScalar() || !ParseByteSize(value.Scalar(), &bytes)) {
        Error(path, "expected a size such as 24GiB, got '" + Show(value) + "'");
      } else {
        static_cast<v1::FsdpSpec*>(msg)->set_device_memory_limit_bytes(bytes);
      }
      return true;
    }
    if (type == "ftune.v1.TrainingSpec" && key == "gradient_checkpointing" && value.IsScalar() &&
        value.Scalar() == "auto") {
      static_cast<v1::TrainingSpec*>(msg)->clear_gradient_checkpointing();
      return true;
    }
    if (type == "ftune.v1.TrainingSpec" && (key == "max_seq_length" || key == "max_length")) {
      const FieldDescriptor* f = msg->GetDescriptor()->FindFieldByName("max_seq_len");
      ReadField(value, path, f, msg);
      return true;
    }
    if (type == "ftune.v1.TrainingSpec" && key == "max_steps") {
      // HF's "max_steps: -1" means "use num_train_epochs".
      int64_t v = 0;
      if (value.IsScalar() && ParseInt(value.Scalar(), &v) && v == -1) {
        static_cast<v1::TrainingSpec*>(msg)->set_max_steps(0);
        return true;
      }
      return false;
    }
    if (type == "ftune.v1.JobSpec" && key == "model" && value.IsScalar()) {
      static_cast<v1::JobSpec*>(msg)->mutable_model()->set_model_name_or_path(value.Scalar());
      return true;
    }
    if (type == "ftune.v1.LoraSpec" && key == "target_modules" && value.IsScalar()) {
      // PEFT accepts a single string; "all-linear" means every projection.
      auto* lora = static_cast<v1::LoraSpec*>(msg);
      lora->clear_target_modules();
      if (value.Scalar() == "all-linear") {
        for (const auto& t : KnownLoraTargets()) lora->add_target_modules(t);
      } else {
        lora->add_target_modules(value.Scalar());
      }
      return true;
    }
    return false;
  }

  void ReadField(const YAML::Node& value, const std::string& path, const FieldDescriptor* f,
                 Message* msg) {
    const Reflection* r = msg->GetReflection();
    if (f->is_map()) {
      if (!value.IsMap()) {
        Error(path, "expected a mapping, got '" + Show(value) + "'");
        return;
      }
      // Only map<string, string> (labels) exists in JobSpec.
      auto* spec = static_cast<v1::JobSpec*>(msg);
      for (const auto& kv : value) {
        if (!kv.second.IsScalar()) {
          Error(Join(path, kv.first.as<std::string>()),
                "expected a string, got '" + Show(kv.second) + "'");
          continue;
        }
        (*spec->mutable_labels())[kv.first.as<std::string>()] = kv.second.Scalar();
      }
      return;
    }
    if (f->is_repeated()) {
      if (value.IsScalar() && f->type() == FieldDescriptor::TYPE_STRING) {
        r->AddString(msg, f, value.Scalar());
        return;
      }
      if (!value.IsSequence()) {
        Error(path, "expected a list, got '" + Show(value) + "'");
        return;
      }
      for (size_t i = 0; i < value.size(); ++i) {
        const std::string item_path = path + "[" + std::to_string(i) + "]";
        if (!value[i].IsScalar() || f->type() != FieldDescriptor::TYPE_STRING) {
          Error(item_path, "expected a string, got '" + Show(value[i]) + "'");
          continue;
        }
        r->AddString(msg, f, value[i].Scalar());
      }
      return;
    }
    if (f->type() == FieldDescriptor::TYPE_MESSAGE) {
      if (value.IsNull()) return;
      ReadMessage(value, path, r->MutableMessage(msg, f));
      return;
    }
    if (!value.IsScalar()) {
      Error(path, "expected a single value, got '" + Show(value) + "'");
      return;
    }
    const std::string& s = value.Scalar();
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_STRING:
        r->SetString(msg, f, s);
        break;
      case FieldDescriptor::CPPTYPE_BOOL: {
        bool b = false;
        if (!ParseBool(s, &b)) Error(path, "expected true or false, got '" + s + "'");
        else r->SetBool(msg, f, b);
        break;
      }
      case FieldDescriptor::CPPTYPE_INT32: {
        int64_t v = 0;
        if (!ParseInt(s, &v) || v < INT32_MIN || v > INT32_MAX)
          Error(path, "expected an integer, got '" + s + "'");
        else r->SetInt32(msg, f, static_cast<int32_t>(v));
        break;
      }
      case FieldDescriptor::CPPTYPE_INT64: {
        int64_t v = 0;
        if (!ParseInt(s, &v)) Error(path, "expected an integer, got '" + s + "'");
        else r->SetInt64(msg, f, v);
        break;
      }
      case FieldDescriptor::CPPTYPE_UINT64: {
        int64_t v = 0;
        if (!ParseInt(s, &v) || v < 0) Error(path, "expected an integer >= 0, got '" + s + "'");
        else r->SetUInt64(msg, f, static_cast<uint64_t>(v));
        break;
      }
      case FieldDescriptor::CPPTYPE_DOUBLE: {
        double v = 0;
        if (!ParseDouble(s, &v)) Error(path, "expected a number, got '" + s + "'");
        else r->SetDouble(msg, f, v);
        break;
      }
      default:
        Error(path, "unsupported field type");
    }
  }

  std::vector<std::string>* errors_;
};

void EmitMessage(YAML::Emitter& out, const Message& msg) {
  const Reflection* r = msg.GetReflection();
  std::vector<const FieldDescriptor*> fields;
  r->ListFields(msg, &fields);
  out << YAML::BeginMap;
  for (const FieldDescriptor* f : fields) {
    out << YAML::Key << f->name() << YAML::Value;
    if (f->is_map()) {
      const auto& spec = static_cast<const v1::JobSpec&>(msg);
      std::map<std::string, std::string> sorted(spec.labels().begin(), spec.labels().end());
      out << YAML::BeginMap;
      for (const auto& kv : sorted) out << YAML::Key << kv.first << YAML::Value << kv.second;
      out << YAML::EndMap;
    } else if (f->is_repeated()) {
      out << YAML::Flow << YAML::BeginSeq;
      for (int i = 0; i < r->FieldSize(msg, f); ++i) out << r->GetRepeatedString(msg, f, i);
      out << YAML::EndSeq;
    } else {
      switch (f->cpp_type()) {
        case FieldDescriptor::CPPTYPE_MESSAGE: EmitMessage(out, r->GetMessage(msg, f)); break;
        case FieldDescriptor::CPPTYPE_STRING: out << r->GetString(msg, f); break;
        case FieldDescriptor::CPPTYPE_BOOL: out << r->GetBool(msg, f); break;
        case FieldDescriptor::CPPTYPE_INT32: out << r->GetInt32(msg, f); break;
        case FieldDescriptor::CPPTYPE_INT64: out << r->GetInt64(msg, f); break;
        case FieldDescriptor::CPPTYPE_UINT64: out << r->GetUInt64(msg, f); break;
        case FieldDescriptor::CPPTYPE_DOUBLE: {
          std::ostringstream s;
          s.precision(17);
          s << r->GetDouble(msg, f);
          out << s.str();
          break;
        }
        default: out << "?";
      }
    }
  }
  out << YAML::EndMap;
}

}  // namespace

bool ParseJobSpecYaml(const std::string& yaml_text, v1::JobSpec* spec,
                      std::vector<std::string>* errors) {
  spec->Clear();
  const size_t before = errors->size();
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    errors->push_back("job spec is not valid YAML: " + std::string(e.what()));
    return false;
  }
  if (root.IsNull()) {
    errors->push_back("job spec is empty");
    return false;
  }
  try {
    YamlReader(errors).ReadMessage(root, "", spec);
  } catch (const YAML::Exception& e) {
    errors->push_back("job spec: " + std::string(e.what()));
  }
  return errors->size() == before;
}

bool LoadJobSpecFile(const std::string& path, v1::JobSpec* spec,
                     std::vector<std::string>* errors) {
  std::ifstream in(path);
  if (!in) {
    errors->push_back("cannot read job spec file '" + path + "'");
    return false;
  }
  std::stringstream buf;
  buf << in.rdbuf();
  const size_t before = errors->size();
  ParseJobSpecYaml(buf.str(), spec, errors);
  for (size_t i = before; i < errors->size(); ++i) (*errors)[i] = path + ": " + (*errors)[i];
  return errors->size() == before;
}

std::string JobSpecToYaml(const v1::JobSpec& spec) {
  YAML::Emitter out;
  EmitMessage(out, spec);
  return std::string(out.c_str()) + "\n";
}

bool ParseByteSize(const std::string& text, int64_t* bytes) {
  std::string s;
  for (char c : text)
    if (!std::isspace(static_cast<unsigned char>(c))) s += c;
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == 0) return false;
  double number = 0;
  if (!ParseDouble(s.substr(0, i), &number)) return false;
  const std::string unit = Lower(s.substr(i));
  double mult = 0;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k" || unit == "kb") mult = 1e3;
  else if (unit == "m" || unit == "mb") mult = 1e6;
  else if (unit == "g" || unit == "gb") mult = 1e9;
  else if (unit == "t" || unit == "tb") mult = 1e12;
  else if (unit == "ki" || unit == "kib") mult = 1024.0;
  else if (unit == "mi" || unit == "mib") mult = 1024.0 * 1024;
  else if (unit == "gi" || unit == "gib") mult = 1024.0 * 1024 * 1024;
  else if (unit == "ti" || unit == "tib") mult = 1024.0 * 1024 * 1024 * 1024;
  else return false;
  const double v = number * mult;
  if (v < 0 || v > 9.0e18) return false;
  *bytes = static_cast<int64_t>(std::llround(v));
  return true;
}

std::string FormatByteSize(int64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (u < 4 && std::fabs(v) >= 1024.0) {
    v /= 1024.0;
    ++u;
  }
  std::ostringstream s;
  if (v == std::floor(v)) s << static_cast<int64_t>(v) << kUnits[u];
  else {
    s.setf(std::ios::fixed);
    s.precision(1);
    s << v << kUnits[u];
  }
  return s.str();
}

const std::vector<std::string>& KnownLoraTargets() {
  static const std::vector<std::string> kTargets = {"q_proj", "k_proj",    "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"};
  return kTargets;
}

void MakeSpecPathsAbsolute(v1::JobSpec* spec, const std::string& base_dir) {
  const auto fix = [&](std::string* path) {
    if (path->empty() || (*path)[0] == '/' || base_dir.empty()) return;
    std::string p = *path;
    while (p.rfind("./", 0) == 0) p = p.substr(2);
    *path = base_dir + (base_dir.back() == '/' ? "" : "/") + p;
  };
  fix(spec->mutable_model()->mutable_model_name_or_path());
  for (std::string& f : *spec->mutable_dataset()->mutable_data_files()) fix(&f);
  for (std::string& f : *spec->mutable_dataset()->mutable_eval_data_files()) fix(&f);
  if (!spec->output_dir().empty()) fix(spec->mutable_output_dir());
}

}  // namespace ftune
