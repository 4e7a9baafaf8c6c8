"""ftune_client against a real coordinator and agent: a tiny real fine-tune
(ftune-rank on 2 CPU slots: NF4 + LoRA + FSDP over Gloo) driven only
through the Python client, with the coordinator killed and restarted in the
middle of watch() (which must resume with after_seq: every event once, in
order), the final state and the events asserted, and a spec file submitted
through the client and through `ftune submit` stored identically.

    client_integration_test.py COORDINATOR AGENT RANK CLI EXAMPLES_DIR
(with <build>/clients/python on PYTHONPATH; ctest sets both).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import grpc

from ftune_client import Client, FtuneError, messages as pb, state_name

COORDINATOR, AGENT, RANK, CLI, EXAMPLES = sys.argv[1:6]
del sys.argv[1:6]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClientIntegrationTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="ftune-pyclient-")
        cls.procs = {}
        cls.logs = []
        cls.address = "127.0.0.1:%d" % free_port()
        cls.token = "client-secret"
        for name, token in (("client.token", cls.token + "\n"), ("agent.token", "agent-secret")):
            with open(os.path.join(cls.dir, name), "w") as f:
                f.write(token)
        cls.model = os.path.join(cls.dir, "tiny")
        subprocess.run([RANK, "init-model", "--preset", "tiny", "--layers", "2", "--vocab-size",
                        "512", "--tokenizer-corpus",
                        os.path.join(EXAMPLES, "data", "instructions.jsonl"), "--out", cls.model],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        cls.coordinator_starts = 0
        cls.start_coordinator()
        cls.start("agent", [AGENT, "--coordinator=" + cls.address,
                            "--token-file=" + os.path.join(cls.dir, "agent.token"),
                            "--work-dir=" + os.path.join(cls.dir, "agent"), "--cpu-slots=2",
                            "--host=py-host", "--rank-binary=" + RANK, "--grace-seconds=2"])
        cls.client = Client(cls.address, token=cls.token, timeout=10)
        try:
            cls.wait_for_agent()
        except BaseException:
            cls.failed = True
            cls.tearDownClass()
            raise

    @classmethod
    def wait_for_agent(cls):
        deadline = time.monotonic() + 30
        while True:
            try:
                if any(a.alive for a in cls.client.agents()):
                    return
            except FtuneError as e:
                if e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
            if time.monotonic() > deadline:
                raise AssertionError("the agent did not register; logs in " + cls.dir)
            time.sleep(0.1)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        for p in cls.procs.values():
            p.kill()
            p.wait()
        for log in cls.logs:
            log.close()
        if cls.failed:
            print("logs kept in", cls.dir)
        else:
            shutil.rmtree(cls.dir, ignore_errors=True)

    failed = False

    def run(self, result=None):
        result = super().run(result)
        if result is not None and not result.wasSuccessful():
            type(self).failed = True
        return result

    @classmethod
    def start(cls, name, argv):
        log = open(os.path.join(cls.dir, name + ".log"), "ab")
        cls.logs.append(log)
        cls.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    @classmethod
    def start_coordinator(cls):
        cls.start("coordinator", [
            COORDINATOR, "--state-dir=" + os.path.join(cls.dir, "state"),
            "--listen=" + cls.address, "--metrics-listen=127.0.0.1:%d" % free_port(),
            "--client-token-file=" + os.path.join(cls.dir, "client.token"),
            "--agent-token-file=" + os.path.join(cls.dir, "agent.token"),
            "--agent-timeout=5", "--grace-seconds=2", "--heartbeat-ms=300", "--tick-ms=50"])
        cls.coordinator_starts += 1

    def spec(self, name, steps):
        # Relative data path, made absolute against base_dir by the client.
        return {
            "name": name,
            "model": self.model,
            "dataset": {"data_files": ["data/instructions.jsonl"]},
            "lora": {"r": 8, "lora_alpha": 16},
            "training": {"max_steps": steps, "save_steps": 4, "per_device_train_batch_size": 2,
                         "max_seq_len": 128, "packing": True, "learning_rate": "2e-3",
                         "lr_scheduler_type": "cosine", "report_to": ["tensorboard"]},
            "resources": {"num_ranks": 2},
            "output_dir": os.path.join(self.dir, "out-" + name),
            "labels": {"suite": "python-client", "run": name},
        }

    def test_a_real_job_through_the_client(self):
        c = self.client
        job = c.submit(self.spec("tiny", 8), base_dir=EXAMPLES)
        self.assertIn(state_name(job.state), ("QUEUED", "SCHEDULED"))
        self.assertEqual(list(job.spec.dataset.data_files),
                         [os.path.join(EXAMPLES, "data/instructions.jsonl")])

        events = []
        restarted = False
        parity_checked = False
        for event in c.watch(job.id):
            events.append(event)
            if event.HasField("step") and event.rank == 0 and not parity_checked:
                parity_checked = True
                self.check_spec_parity_while_slots_are_busy()
            if event.HasField("step") and event.step.step == 3 and not restarted:
                # kill -9 and restart on the same port and state: watch()
                # must reconnect and continue after the last event it gave.
                restarted = True
                self.procs["coordinator"].send_signal(signal.SIGKILL)
                self.procs["coordinator"].wait()
                time.sleep(0.5)
                self.start_coordinator()
        self.assertTrue(restarted, "the job ended before step 3")

        seqs = [e.seq for e in events]
        self.assertEqual(seqs, list(range(1, len(events) + 1)), "gaps or repeats across the restart")
        states = [pb.JobState.Name(e.state_change.to) for e in events if e.HasField("state_change")]
        self.assertEqual(states[:3], ["QUEUED", "SCHEDULED", "RUNNING"])
        self.assertEqual(states[-1], "SUCCEEDED")
        rank0_steps = [e.step.step for e in events if e.HasField("step") and e.rank == 0]
        self.assertEqual(rank0_steps, list(range(1, 9)))
        losses = [e.step.loss for e in events if e.HasField("step") and e.rank == 0]
        self.assertTrue(all(l > 0 for l in losses))
        self.assertTrue(any(e.HasField("checkpoint") and e.checkpoint.complete for e in events))
        self.assertTrue(any(e.HasField("done") and e.done.adapter_path for e in events))

        final = c.wait(job.id, timeout=30)
        self.assertEqual(state_name(final.state), "SUCCEEDED")
        self.assertEqual(final.last_step, 8)
        self.assertTrue(os.path.exists(os.path.join(final.adapter_path, "adapter_config.json")))
        # report_to: [tensorboard] through the control plane: rank 0's file,
        # in the job's own directory under output_dir.
        runs = os.path.join(self.dir, "out-tiny", job.id, "runs", "tiny")
        self.assertEqual(len([f for f in os.listdir(runs) if "tfevents" in f]), 1)

        steps = [cp.step for cp in c.checkpoints(job.id) if cp.complete]
        self.assertIn(4, steps)
        self.assertIn(8, steps)
        self.assertIn(job.id, [j.id for j in c.jobs(labels={"run": "tiny"}, states=["SUCCEEDED"])])
        self.assertNotIn(job.id, [j.id for j in c.jobs(states=["RUNNING", "QUEUED"])])
        # A replay from a position: the stored events after it, then the end.
        tail = list(c.watch(job.id, after_seq=len(events) - 3, follow=False))
        self.assertEqual([e.seq for e in tail], seqs[-3:])

    def check_spec_parity_while_slots_are_busy(self):
        """The same YAML through the client and through `ftune submit` is
        stored as the same spec. Both jobs queue (the tiny job holds both
        slots) and are cancelled while queued."""
        path = os.path.join(self.dir, "parity.yaml")
        with open(path, "w") as f:
            f.write("name: parity\n"
                    "model: tiny\n"
                    "dataset: {data_files: " + os.path.join(EXAMPLES, "data/instructions.jsonl")
                    + "}\n"
                    "lora: {target_modules: all-linear, r: 4}\n"
                    "training: {max_steps: -1, num_train_epochs: 1, max_seq_length: 128,"
                    " learning_rate: 1e-4, report_to: tensorboard}\n"
                    "resources: {num_ranks: 2, min_gpu_memory: 0GiB}\n"
                    "labels: {suite: python-client, n: 1}\n")
        via_client = self.client.submit(path, base_dir=self.dir)
        out = subprocess.run([CLI, "--coordinator", self.address, "--token-file",
                              os.path.join(self.dir, "client.token"), "submit", path],
                             cwd=self.dir, check=True, capture_output=True, text=True).stdout
        via_cli = self.client.get(out.split()[-1])
        self.assertEqual(via_client.spec, via_cli.spec)
        for j in (via_client, via_cli):
            self.assertEqual(state_name(self.client.cancel(j.id).state), "CANCELLED")

    def test_errors_carry_the_status_and_the_coordinators_words(self):
        with self.assertRaises(FtuneError) as e:
            self.client.get("job-999999")
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(FtuneError) as e:
            self.client.submit({"model": self.model,
                                "dataset": {"data_files": ["/x.jsonl"]},
                                "lora": {"r": -3}})
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("lora.r (-3)", e.exception.details)
        with Client(self.address, token="wrong") as bad:
            with self.assertRaises(FtuneError) as e:
                bad.jobs()
        self.assertEqual(e.exception.code, grpc.StatusCode.UNAUTHENTICATED)
        with self.assertRaises(ValueError):
            self.client.jobs(states=["SLEEPING"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
