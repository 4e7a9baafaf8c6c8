"""Client: the coordinator's JobService for Python services.

Every method is one RPC (or, for `watch`, `wait` and `jobs`, the loop the CLI
runs around one) and returns the protobuf messages of proto/ftune/v1/
(job_service_pb2.Job, JobEvent, Checkpoint, Agent), so fields keep the names
the docs and `ftune -o json` use. Errors are FtuneError, carrying the gRPC
status code and the coordinator's message (which names the offending key or
job).

watch() follows a job as `ftune watch` does: when the stream breaks (a
coordinator restart, a network blip) it reconnects with after_seq set to the
last event it yielded, so no event is lost or repeated, and gives up only
after `reconnect_window` seconds without progress.

Thread-safety: a Client may be shared by threads (gRPC channels are); each
watch() iterator belongs to the thread that iterates it.
"""

import ipaddress
import time
import uuid

import grpc

from ftune.v1 import job_service_pb2 as pb
from ftune.v1 import job_service_pb2_grpc as pb_grpc

from .spec import job_spec

FINAL_STATES = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})
# UNAVAILABLE: no connection or the server went away; ABORTED: the server
# ended the call while shutting down. Both are worth a retry.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})


class FtuneError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `details` the message."""

    def __init__(self, what, code, details):
        self.code = code
        self.details = details
        super().__init__("%s: %s: %s" % (what, code.name if code else "ERROR", details))


def _state(value):
    if isinstance(value, str):
        try:
            return pb.JobState.Value(value.upper())
        except ValueError:
            names = [n for n in pb.JobState.keys() if n != "JOB_STATE_UNSPECIFIED"]
            raise ValueError("unknown job state '%s'; one of: %s"
                             % (value, ", ".join(names))) from None
    return int(value)


def is_loopback_address(address):
    """Whether a gRPC address stays on this host, by the rule the CLI and the
    coordinator use: "localhost", 127.0.0.0/8 and ::1 (as "host:port",
    "[v6]:port", a bare host, with or without a "dns:///", "ipv4:" or "ipv6:"
    prefix) and unix sockets are; a wildcard ("0.0.0.0", "[::]") is not."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if address.startswith(prefix):
            address = address[len(prefix):]
            break
    if address.startswith("["):
        close = address.find("]")
        host = address[1:close] if close >= 0 else address[1:]
    elif address.count(":") == 1:
        host = address.split(":", 1)[0]
    else:  # no port, or a bare IPv6 host
        host = address
    host = host.lower()
    if host in ("localhost", "localhost."):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.version == 6:
        return ip == ipaddress.IPv6Address("::1")
    return ip.is_loopback


class Client:
    """A connection to one coordinator.

    address:  "host:port" of the coordinator's gRPC listener.
    token:    the client bearer token (the coordinator's --client-token-file),
              sent as 'authorization: Bearer <token>'; None for none.
    tls_ca:   path of a PEM CA bundle; given, the connection uses TLS.
    timeout:  seconds for each unary call.
    insecure: send the token without TLS to a coordinator on another host
              (a network you trust); refused otherwise, as `ftune` refuses
              without --insecure.
    """

    def __init__(self, address="127.0.0.1:7450", token=None, tls_ca=None, timeout=30.0,
                 insecure=False):
        # The token is the user's identity: never in plaintext off this host.
        if token and not tls_ca and not insecure and not is_loopback_address(address):
            raise ValueError(
                "refusing to send the token in plaintext to %s, which is not on this host: "
                "pass tls_ca (the coordinator serves TLS), or insecure=True on a network you "
                "trust" % address)
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", "Bearer " + token.strip()),) if token else ()
        # watch() reconnects itself: gRPC's default backoff (up to two
        # minutes) would leave the channel refusing calls long after the
        # coordinator is back.
        options = [("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        if tls_ca:
            with open(tls_ca, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.JobServiceStub(self._channel)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, what, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise FtuneError(what, e.code(), e.details()) from None

    # --- Jobs

    def submit(self, spec, request_id=None, base_dir=None):
        """Submits a job: `spec` is a dict with the CLI's YAML keys, a path to
        a job YAML file, or a JobSpec. Relative paths are made absolute
        against base_dir (default: the current directory). request_id makes
        a retried submit create one job (a new one is drawn when None).
        Returns the stored Job (QUEUED, with its id)."""
        request = pb.CreateJobRequest(spec=job_spec(spec, base_dir=base_dir),
                                      request_id=request_id or str(uuid.uuid4()))
        return self._call("cannot submit job", self._stub.CreateJob, request)

    def get(self, job_id):
        return self._call("cannot get job " + job_id, self._stub.GetJob,
                          pb.GetJobRequest(job_id=job_id))

    def jobs(self, labels=None, states=None, page_size=100):
        """Every job matching all `labels` ({key: value}) and any of `states`
        (names such as "RUNNING" or JobState values), oldest first."""
        request = pb.ListJobsRequest(page_size=page_size,
                                     states=[_state(s) for s in (states or [])],
                                     labels={str(k): str(v) for k, v in (labels or {}).items()})
        out = []
        while True:
            response = self._call("cannot list jobs", self._stub.ListJobs, request)
            out.extend(response.jobs)
            if not response.next_page_token:
                return out
            request.page_token = response.next_page_token

    def cancel(self, job_id):
        """Asks the job's ranks to save a checkpoint and stop; returns the Job
        (CANCELLING, or CANCELLED when it was still queued)."""
        return self._call("cannot cancel job " + job_id, self._stub.CancelJob,
                          pb.CancelJobRequest(job_id=job_id))

    def checkpoints(self, job_id):
        return list(self._call("cannot list checkpoints of job " + job_id,
                               self._stub.ListCheckpoints,
                               pb.ListCheckpointsRequest(job_id=job_id)).checkpoints)

    def agents(self):
        return list(self._call("cannot list agents", self._stub.ListAgents,
                               pb.ListAgentsRequest()).agents)

    # --- Following a job

    def watch(self, job_id, after_seq=0, follow=True, reconnect_window=60.0,
              sleep=time.sleep, clock=time.monotonic):
        """Yields the job's events (JobEvent) after `after_seq`, in order.

        follow=True: until the job ends, reconnecting as described above;
        follow=False: the events stored so far. Raises FtuneError when the
        job does not exist, or when no event came for `reconnect_window`
        seconds of failed reconnects."""
        last_seq = after_seq
        backoff = 0.2
        failing_since = clock()
        while True:
            request = pb.WatchJobRequest(job_id=job_id, after_seq=last_seq, follow=follow)
            progressed = False
            failure = None
            call = self._stub.WatchJob(request, metadata=self._metadata)
            try:
                for response in call:
                    for event in response.events:
                        # A coordinator replaying from an older position must
                        # not make us yield an event twice.
                        if event.seq <= last_seq:
                            continue
                        last_seq = event.seq
                        progressed = True
                        yield event
            except grpc.RpcError as e:
                if e.code() not in _TRANSIENT:
                    raise FtuneError("cannot watch job " + job_id, e.code(), e.details()) from None
                failure = e
            finally:
                call.cancel()  # a consumer that stopped early ends the stream
            if not follow and failure is None:
                return
            if failure is None:
                # The stream ends when the job does; the job record says how.
                try:
                    job = self.get(job_id)
                    if job.state in FINAL_STATES:
                        return
                    failing_since = clock()  # a live job's stream closed: not a failure
                except FtuneError as e:
                    if e.code not in _TRANSIENT:
                        raise
                    failure = e
            if progressed:
                backoff = 0.2
                failing_since = clock()
            elif clock() - failing_since > reconnect_window:
                code = failure.code() if isinstance(failure, grpc.RpcError) else getattr(
                    failure, "code", grpc.StatusCode.UNAVAILABLE)
                raise FtuneError("cannot watch job " + job_id, code,
                                 "gave up reconnecting after %gs" % reconnect_window)
            sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def wait(self, job_id, timeout=None, poll=1.0):
        """Blocks until the job ends; returns its final Job. TimeoutError
        when `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.state in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("job %s still %s after %gs"
                                   % (job_id, pb.JobState.Name(job.state), timeout))
            time.sleep(poll if deadline is None else
                       max(0.0, min(poll, deadline - time.monotonic())))


def state_name(state):
    """pb.RUNNING -> "RUNNING"."""
    return pb.JobState.Name(state)
