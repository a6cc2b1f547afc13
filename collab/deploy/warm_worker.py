"""The warm ClientApp worker's loop: acquire a task from the SuperNode's Runtime API, run the ClientApp in this
process, push the reply and the context, and go on with the next task, never exiting in between.

It does what Flower 1.42's ``flower-superexec`` + ``flwr-clientapp`` pair does for one message
(``flwr/supercore/superexec/run_superexec.py``, ``flwr/supernode/runtime/run_clientapp.py``), with Flower's own
pieces: :class:`~flwr.supercore.runtime.RuntimeHttpClient` over TLS, ``AcquireTask`` signed with the SuperExec
secret (``SuperExecAuthHttpInterceptor``), the task token on every other call, ``pull_task_input`` /
``push_message`` / ``push_task_output`` of ``run_clientapp`` and its error replies, a task heartbeat, the FAB
installed and its ClientApp loaded by Flower's loader, once per FAB hash. What it does not take over from
``flwr-clientapp``: exiting after the task (and the SIGINT Flower's helpers send themselves on a refused token or
an expired task: here only that task fails), runtime dependency installation (off in this project), telemetry.
The program around it (argv, the SuperNode it starts, signals): :mod:`.warm_clientapp`.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import DEBUG, ERROR, INFO, WARNING
from typing import Any, Protocol

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
"""The Runtime API call the SuperExec secret signs (as Flower's SuperExec signs it)."""
TASK_RETRY_S = 60.0
"""How long a task's Runtime API calls retry a SuperNode that does not answer before the task fails."""
OBJECT_BACKOFF_S = (0.05, 0.5)
"""First and longest wait for a message object the SuperNode has not received yet (Flower's: 1 s and 10 s)."""
_RETRYABLE_STATUS = frozenset({502, 503, 504})
_TRANSPORT_ERRORS = (httpx.TransportError,)


class TaskIO(Protocol):
    """How the worker talks to the SuperNode about one task (Flower's functions; fakes in tests)."""

    def task_client(self, token: str) -> Any:
        """A Runtime API client that carries the task token."""

    def pull(self, client: Any) -> tuple[Message, Context, Any, Any]:
        """The task's message, context, run and FAB."""

    def push_reply(self, client: Any, reply: Message, context: Context) -> None:
        """Send the reply message."""

    def finish(self, client: Any, context: Context | None, sub_status: str, details: str, stopping: bool) -> None:
        """Report the task done and the context the app left (``stopping``: one try, the worker is going away)."""

    def heartbeat(self, client: Any) -> bool:
        """One task heartbeat; False: not delivered (retried), True: delivered or refused (then logged)."""

    def close(self, client: Any) -> None:
        """Release the task client."""


def _giveup(exc: Exception) -> bool:
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in _RETRYABLE_STATUS


class FlowerTaskIO:
    """:class:`TaskIO` with Flower 1.42's Runtime API client and ``run_clientapp``'s helpers, over TLS."""

    def __init__(self, runtime_api_address: str, root_certificates: bytes) -> None:
        self.address = runtime_api_address
        self.root_certificates = root_certificates
        self._retries: dict[int, RetryInvoker] = {}

    def acquire_client(self, secret: bytes) -> RuntimeHttpClient:
        """A client for ``AcquireTask`` signed with the SuperExec ``secret``; no retries (the loop polls)."""
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=False, root_certificates=self.root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD})])

    def task_client(self, token: str) -> RuntimeHttpClient:
        """A client with the task ``token``, retrying transport errors and 502-504 for :data:`TASK_RETRY_S`."""
        retry = RetryInvoker(lambda: exponential(base_delay=0.2, max_delay=2), (*_TRANSPORT_ERRORS,
                             httpx.HTTPStatusError), max_tries=None, max_time=TASK_RETRY_S, should_giveup=_giveup)
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=False, root_certificates=self.root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)], retry_invoker=retry)
        self._retries[id(client)] = retry
        return client

    def pull(self, client: RuntimeHttpClient) -> tuple[Message, Context, Any, Any]:
        """Message, context, run and FAB of the task: ``run_clientapp.pull_task_input`` with a short object backoff.

        The SuperNode hands out a task before it has downloaded the message's objects from the SuperLink; a
        fresh ``flwr-clientapp`` starts so late that they are there, a warm worker asks at once, and Flower's
        backoff for an object not there yet (1, 2, 4 ... s) would add seconds: here 0.05 s doubling up to 0.5 s.
        """
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
        from flwr.supercore.task_identity import TaskIdentity

        response = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = response.task_id
        TaskIdentity.run_id = response.run.run_id
        TaskIdentity.node_id = response.context.node_id
        context = context_from_proto(response.context)
        run = run_from_proto(response.run)
        fab = fab_from_proto(response.fab)
        messages = client.PullMessages(PullAppMessagesRequest())
        if not messages.messages_list:
            raise RuntimeError("No messages received from Runtime API")
        node = Node(node_id=context.node_id)
        tree = messages.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message, initial_backoff=OBJECT_BACKOFF_S[0], backoff_cap=OBJECT_BACKOFF_S[1])
        message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
        return message, context, run, fab

    def push_reply(self, client: RuntimeHttpClient, reply: Message, context: Context) -> None:
        """``run_clientapp.push_message``."""
        from flwr.supernode.runtime.run_clientapp import push_message

        push_message(client, reply, context)

    def finish(self, client: RuntimeHttpClient, context: Context | None, sub_status: str, details: str,
               stopping: bool) -> None:
        """``run_clientapp.push_task_output`` (it logs and swallows HTTP errors); one try when ``stopping``."""
        from flwr.supernode.runtime.run_clientapp import push_task_output

        retry = self._retries.get(id(client))
        if stopping and retry is not None:
            retry.max_tries = 1  # as flwr-clientapp's exit handler
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)

    def heartbeat(self, client: RuntimeHttpClient) -> bool:
        """Flower's task heartbeat, without the SIGINT its own sends when the task is gone."""
        try:
            response = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except _TRANSPORT_ERRORS:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in _RETRYABLE_STATUS:
                return False
            log(WARNING, "[warm-clientapp] task heartbeat refused (%s); the task will fail", err.response.status_code)
            return True
        if not response.success:
            log(WARNING, "[warm-clientapp] the SuperNode no longer knows this task; it will fail")
        return True

    def close(self, client: RuntimeHttpClient) -> None:
        """Close the client."""
        self._retries.pop(id(client), None)
        client.close()


@dataclass
class AppCache:
    """ClientApps by FAB hash: installed (``$FLWR_HOME/apps``) and loaded with Flower's loader once each."""

    install: Callable[[bytes], Any] | None = None
    load: Callable[[str, str, str], ClientApp] | None = None
    apps: dict[str, ClientApp] = field(default_factory=dict)

    def get(self, run: Any, fab: Any) -> ClientApp:
        """The ClientApp of the run's FAB (``LoadClientAppError`` when it cannot be loaded)."""
        app = self.apps.get(fab.hash_str)
        if app is not None:
            return app
        install, load = self.install, self.load
        if install is None:
            from flwr.cli.install import install_from_fab

            def install(content: bytes) -> Any:
                return install_from_fab(content, skip_prompt=True)
        if load is None:
            from flwr.clientapp.utils import get_load_client_app_fn

            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        start = time.perf_counter()
        install(fab.content)
        app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.apps[fab.hash_str] = app
        log(INFO, "[warm-clientapp] loaded the ClientApp of FAB %s (%s %s) in %.2f s; kept for later messages",
            fab.hash_str[:12], run.fab_id, run.fab_version, time.perf_counter() - start)
        return app


@dataclass
class TaskResult:
    """What became of one task."""

    task_id: int
    sub_status: str
    details: str
    message_type: str
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # pull, app, push, finish: seconds each


class WarmWorker:
    """Acquires ClientApp tasks from a SuperNode's Runtime API and runs them in this process, one after the other."""

    def __init__(self, acquire: Callable[[], tuple[Any, str] | None], io: TaskIO, apps: AppCache | None = None,
                 poll_interval: float = 0.25, sleep: Callable[[float], None] = time.sleep,
                 close: Callable[[], None] = lambda: None) -> None:
        self.acquire = acquire
        self._close = close
        self.io = io
        self.apps = apps or AppCache()
        self.poll_interval = float(poll_interval)
        self.sleep = sleep
        self.results: list[TaskResult] = []
        self.stopping = False

    @classmethod
    def connect(cls, runtime_api_address: str, root_certificates: bytes, secret: bytes,
                poll_interval: float = 0.25) -> WarmWorker:
        """A worker for the Runtime API at ``runtime_api_address`` (TLS with ``root_certificates``)."""
        io = FlowerTaskIO(runtime_api_address, root_certificates)
        client = io.acquire_client(secret)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])

        def acquire() -> tuple[Any, str] | None:
            response = client.AcquireTask(request)
            return (response.task, response.token) if response.HasField("task") and response.token else None

        return cls(acquire, io, poll_interval=poll_interval, close=client.close)

    def close(self) -> None:
        """Close the connection to the Runtime API (a SuperNode stopping waits for open connections)."""
        self._close()

    def serve(self, exited: Callable[[], int | None] = lambda: None, max_tasks: int | None = None) -> int | None:
        """Run tasks until ``exited()`` returns an exit code (the SuperNode's), ``max_tasks`` ran, or a stop.

        Returns that exit code (None otherwise). A SuperNode that does not answer is polled again, at most every 2 s.
        """
        delay = self.poll_interval
        down_since: float | None = None
        while not self.stopping:
            code = exited()
            if code is not None:
                return code
            if max_tasks is not None and len(self.results) >= max_tasks:
                return None
            try:
                acquired = self.acquire()
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    log(DEBUG, "[warm-clientapp] Runtime API not answering yet (%s); polling", exc)
                delay = min(2.0, delay * 2)
                self.sleep(delay)
                continue
            if down_since is not None:
                log(INFO, "[warm-clientapp] Runtime API answers after %.1f s", time.monotonic() - down_since)
                down_since = None
            delay = self.poll_interval
            if acquired is None:
                self.sleep(self.poll_interval)
                continue
            task, token = acquired
            self.run_task(task, token)
        return None

    def run_task(self, task: Any, token: str) -> TaskResult:
        """Pull the task's message, call the ClientApp, push the reply and the context (as ``flwr-clientapp``)."""
        start = time.perf_counter()
        client = self.io.task_client(token)
        heartbeat = HeartbeatSender(lambda: self.io.heartbeat(client))
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        stopping = False
        phases: dict[str, float] = {}
        mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = now - mark
            mark = now

        try:
            heartbeat.start()
            message, context, run, fab = self.io.pull(client)
            lap("pull")
            app = self.apps.get(run, fab)
            reply = app(message=message, context=context)
            lap("app")
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - any ClientApp failure is the task's, answered as Flower does
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            if isinstance(ex, LoadClientAppError):
                code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, \
                    "An exception was raised when attempting to load `ClientApp`"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        except BaseException:
            stopping = True
            details = "the warm ClientApp worker was stopped during the task"
            raise
        finally:
            try:
                if reply is not None and context is not None and not stopping:
                    try:
                        self.io.push_reply(client, reply, context)
                    except Exception as ex:  # noqa: BLE001 - as flwr-clientapp: logged, the task fails
                        log(ERROR, "Failed to push reply message", exc_info=ex)
                        sub_status, details = SubStatus.FAILED, f"pushing the reply failed: {ex}"
                lap("push")
                self.io.finish(client, context, sub_status, details, stopping)
                lap("finish")
            finally:
                if heartbeat.is_running:
                    heartbeat.stop()
                self.io.close(client)
        kind = message.metadata.message_type if message is not None else "?"
        result = TaskResult(int(getattr(task, "task_id", 0)), sub_status, details, kind, time.perf_counter() - start,
                            phases)
        self.results.append(result)
        log(INFO, "[warm-clientapp] task %s (%s message) %s in %.2f s (%s)", result.task_id, kind, sub_status,
            result.seconds, ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
        return result


def preload(modules: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Import ``modules`` now (torch and the ClientApp, once for the worker's life); module -> "" or the error."""
    errors = {}
    for module in modules:
        start = time.perf_counter()
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a task will report it when it loads the app
            errors[module] = f"{type(exc).__name__}: {exc}"
            log(ERROR, "[warm-clientapp] could not preload %s: %s", module, errors[module])
            continue
        errors[module] = ""
        log(INFO, "[warm-clientapp] preloaded %s in %.2f s", module, time.perf_counter() - start)
    return errors
