"""ftune_client: drive an ftune coordinator from Python.

    from ftune_client import Client

    with Client("coordinator:7450", token=open("client.token").read()) as c:
        job = c.submit("examples/tiny-qlora.yaml")      # or a dict, same keys
        for event in c.watch(job.id):                   # resumes after a break
            if event.HasField("step"):
                print(event.step.step, event.step.loss)
        print(state_name(c.wait(job.id).state))

The gRPC stubs (the `ftune.v1` modules) are generated from proto/ when ftune
is built; put <build>/clients/python on PYTHONPATH (docs/control-plane.md).
"""

try:
    from ftune.v1 import job_service_pb2 as messages  # noqa: F401
except ImportError as e:  # pragma: no cover - a setup problem, said plainly
    raise ImportError(
        "ftune_client needs the stubs generated from proto/ (module ftune.v1): build ftune "
        "(target ftune_python_client) and put <build>/clients/python on PYTHONPATH (%s)" % e
    ) from e

from .client import (FINAL_STATES, Client, FtuneError, is_loopback_address,  # noqa: E402
                     state_name)
from .spec import SpecError, job_spec  # noqa: E402

__all__ = ["Client", "FtuneError", "SpecError", "FINAL_STATES", "is_loopback_address",
           "job_spec", "messages", "state_name"]
