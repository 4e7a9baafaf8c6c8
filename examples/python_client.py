#!/usr/bin/env python3
"""Submit a job and follow it from Python, as another service would.

    PYTHONPATH=build/clients/python /usr/bin/python3 examples/python_client.py \
        [--coordinator 127.0.0.1:7450] [--token-file FILE] [--tls-ca PEM] [JOB.yaml]

With the demo's coordinator and agent running (scripts/demo.sh) and its
model written, the default job is examples/tiny-qlora.yaml. Prints the loss
per step, checkpoints and evals as they stream (the watch survives a
coordinator restart), then the final state and the adapter; exits 0 when the
job SUCCEEDED.
"""
import argparse
import os
import sys

from ftune_client import Client, state_name


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=os.path.join(here, "tiny-qlora.yaml"))
    parser.add_argument("--coordinator", default=os.environ.get("FTUNE_COORDINATOR",
                                                                "127.0.0.1:7450"))
    parser.add_argument("--token-file", default=os.environ.get("FTUNE_TOKEN_FILE"))
    parser.add_argument("--tls-ca")
    args = parser.parse_args()
    token = open(args.token_file).read().strip() if args.token_file else None

    with Client(args.coordinator, token=token, tls_ca=args.tls_ca) as client:
        # Relative paths in the file resolve against the repository root, as
        # `ftune submit` run from there would.
        job = client.submit(args.spec, base_dir=os.path.dirname(here))
        print("submitted", job.id, job.spec.name)
        for event in client.watch(job.id):
            kind = event.WhichOneof("payload")
            if kind == "step" and event.rank == 0:
                print("step %4d  loss %.4f  lr %.2e  tok/s %.0f" % (
                    event.step.step, event.step.loss, event.step.learning_rate,
                    event.step.tokens_per_second))
            elif kind == "eval":
                print("eval at step %d: loss %.4f" % (event.eval.step, event.eval.eval_loss))
            elif kind == "checkpoint" and event.checkpoint.complete:
                print("checkpoint", event.checkpoint.path)
            elif kind == "state_change":
                print("state", state_name(event.state_change.to), event.state_change.reason)
        final = client.wait(job.id)
        print(job.id, state_name(final.state), "adapter:", final.adapter_path or "-")
        return 0 if state_name(final.state) == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
