"""ftune_client's spec reader: the CLI's YAML keys and spellings, paths made
absolute, and every unreadable key named. (That the coordinator stores the
same spec for a file submitted through the client and through `ftune submit`
is checked in client_integration_test.py.)

    PYTHONPATH=<build>/clients/python python3 tests/python/spec_test.py EXAMPLES_DIR
"""

import os
import sys
import unittest

from ftune_client import SpecError, job_spec

EXAMPLES = sys.argv.pop(1) if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "..", "examples")


class SpecTest(unittest.TestCase):
    def test_every_example_reads(self):
        names = sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".yaml"))
        self.assertTrue(names)
        for name in names:
            with self.subTest(example=name):
                spec = job_spec(os.path.join(EXAMPLES, name), base_dir="/base")
                self.assertTrue(spec.model.model_name_or_path.startswith("/"))
                for f in spec.dataset.data_files:
                    self.assertTrue(f.startswith("/"), f)

    def test_the_cli_spellings(self):
        spec = job_spec({
            "name": "s",
            "model": "models/tiny",
            "dataset": {"data_files": "./train.jsonl", "eval_data_files": ["/abs/eval.jsonl"]},
            "lora": {"target_modules": "all-linear", "r": "16"},
            "training": {"max_steps": -1, "num_train_epochs": 2, "max_seq_length": 512,
                         "learning_rate": "2e-4", "packing": "yes", "report_to": "tensorboard",
                         "profile_steps": 5},
            "resources": {"min_gpu_memory": "40GiB", "num_ranks": 2.0},
            "labels": {"team": "nlp", "tier": 1},
            "output_dir": "out",
        }, base_dir="/home/u")
        self.assertEqual(spec.model.model_name_or_path, "/home/u/models/tiny")
        self.assertEqual(list(spec.dataset.data_files), ["/home/u/train.jsonl"])
        self.assertEqual(list(spec.dataset.eval_data_files), ["/abs/eval.jsonl"])
        self.assertEqual(list(spec.lora.target_modules),
                         ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"])
        self.assertEqual(spec.lora.r, 16)
        self.assertEqual(spec.training.max_steps, 0)
        self.assertEqual(spec.training.max_seq_len, 512)
        self.assertAlmostEqual(spec.training.learning_rate, 2e-4)
        self.assertTrue(spec.training.packing)
        self.assertEqual(list(spec.training.report_to), ["tensorboard"])
        self.assertEqual(spec.training.profile_steps, "5")
        self.assertEqual(spec.resources.min_gpu_memory_bytes, 40 << 30)
        self.assertEqual(spec.resources.num_ranks, 2)
        self.assertEqual(dict(spec.labels), {"team": "nlp", "tier": "1"})
        self.assertEqual(spec.output_dir, "/home/u/out")

    def test_every_problem_is_named_by_its_key(self):
        with self.assertRaises(SpecError) as e:
            job_spec({"model": {"model_name_or_path": "/m"},
                      "training": {"learning_rate": "fast", "max_steps": 1.5, "foo": 1},
                      "seed": 3,
                      "resources": {"min_gpu_memory": "lots"},
                      "lora": {"use_rslora": "maybe"}})
        text = "\n".join(e.exception.problems)
        for expected in ("training.learning_rate: expected a number, got 'fast'",
                         "training.max_steps: expected an integer, got '1.5'",
                         "training.foo: unknown key; known keys here: learning_rate",
                         "seed: unknown key; did you mean 'training.seed'?",
                         "resources.min_gpu_memory: expected a size such as 40GiB",
                         "lora.use_rslora: expected true or false, got 'maybe'"):
            self.assertIn(expected, text)
        self.assertEqual(len(e.exception.problems), 6, text)

    def test_a_missing_file_is_an_error(self):
        with self.assertRaises(SpecError) as e:
            job_spec("/nonexistent/job.yaml")
        self.assertIn("/nonexistent/job.yaml: cannot read", str(e.exception))


if __name__ == "__main__":
    unittest.main(verbosity=2)
