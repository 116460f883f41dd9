"""The onnx engine: tensor models through onnxruntime. The only module that imports ``onnxruntime``.

One :class:`OnnxModel` per loaded ``.onnx`` file. Invariants:

* **One worker thread per model**: the session is created and run on the model's single-thread executor,
  never on the event loop; requests run one at a time.
* **Bounded admission**: requests wait in an :class:`~agent.inference.scheduler.AdmissionQueue` (at most
  ``max_queue`` requests and ``max_queue_bytes`` input bytes; past either, :class:`~agent.errors.OverloadedError`
  with ``retry_after``), ``interactive`` before ``batch``, FIFO within a class. The executor's own queue never
  holds more than one task per model (the *pump*, which takes waiting requests one at a time until none is
  left), plus the close. A request whose caller left (disconnect) or whose deadline passed while it waited
  leaves the queue at once and is never run; the pump checks both again just before a run. A run already
  started is not interrupted (onnxruntime cannot be): past its deadline the caller gets
  :class:`~agent.errors.DeadlineExceededError` at once and the result is discarded.
* **CPU only, bounded threads**: the CPU execution provider with ``intra_op_num_threads`` = the spec's
  threads; sequential execution, so ``inter_op_num_threads`` is 1 (a parallel executor would add a second
  pool of the same size on a box with few cores); worker threads do not spin between requests.
* **Inputs are checked before the graph sees them**: exactly the declared input names, each a numpy array of
  the declared dtype (no silent casting) and rank, fixed dimensions equal, and a named symbolic dimension
  bound to one size across all inputs. Anything else is a :class:`~agent.errors.BadRequestError` whose
  message names the input and what was expected.
* Only tensor inputs and outputs are supported; a graph with sequence or map values is refused at load.
* Native failures become :class:`~agent.errors.EngineLoadError` (load) or
  :class:`~agent.errors.InferenceError` (run); onnxruntime's own "invalid argument" at run time (a value the
  graph rejects) is a :class:`~agent.errors.BadRequestError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from agent.errors import AgentError, BadRequestError, DeadlineExceededError, EngineLoadError, InferenceError
from agent.inference.base import (
    Admission,
    LoadedModel,
    LoadStats,
    ModelSpec,
    QueueKind,
    TensorSpec,
    check_model_file,
    native_load_lock,
    resident_bytes,
    trim_heap,
)
from agent.inference.scheduler import AdmissionQueue, Ticket, await_turn

__all__ = ["OnnxModel"]

_ORT_DTYPES: Final[Mapping[str, str]] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}
_ORT_LOG_ERROR: Final = 3
_DEFAULT_ADMISSION: Final = Admission()
_ESTIMATE_FACTOR: Final = 2
"""onnxruntime holds every initializer plus a prepacked copy of the weights of MatMul, Conv and RNN nodes:
a MatMul graph measured 2.0x its file size, so twice the file size is the floor of the memory charged."""


def _tensor_specs(args: list[Any], what: str, spec: ModelSpec) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise EngineLoadError(f"model {spec.name!r}: {what} {arg.name!r} has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int | str) else None for d in (arg.shape or []))
        specs.append(TensorSpec(name=arg.name, dtype=dtype, shape=shape))
    return tuple(specs)


class _Run:
    """One queued run: its checked inputs, its deadline, and the future the pump resolves."""

    __slots__ = ("cancelled", "deadline", "feeds", "future", "timeout_s")

    def __init__(self, feeds: dict[str, np.ndarray], timeout_s: float | None) -> None:
        self.feeds = feeds
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.cancelled = False  # the caller left or its deadline passed: not to be started
        self.future: concurrent.futures.Future[dict[str, np.ndarray]] = concurrent.futures.Future()


def _format_shape(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class OnnxModel(LoadedModel):
    """An ONNX graph served by onnxruntime on its own worker thread. Build with :meth:`load`."""

    def __init__(
        self,
        spec: ModelSpec,
        session: ort.InferenceSession,
        executor: concurrent.futures.ThreadPoolExecutor,
        memory_bytes: int,
    ) -> None:
        """Wrap an opened session; use :meth:`load` instead of calling this directly."""
        self._spec = spec
        self._session: ort.InferenceSession | None = session
        self._executor = executor
        self._memory_bytes = memory_bytes
        self._inputs = _tensor_specs(session.get_inputs(), "input", spec)
        self._outputs = _tensor_specs(session.get_outputs(), "output", spec)
        self._closed = False
        self._queue: AdmissionQueue[_Run] = AdmissionQueue(
            spec.name, 1, spec.max_queue, spec.max_queue_bytes, unit="input bytes"
        )
        self._pump_lock = threading.Lock()  # guards _pumping together with the queue's emptiness
        self._pumping = False  # a pump task is in the executor (or running)

    @classmethod
    def load(cls, spec: ModelSpec) -> OnnxModel:
        """Open ``spec``'s ONNX file on a new worker thread and return the loaded model. Blocking.

        Raises:
            EngineLoadError: missing file, wrong size, a graph onnxruntime refuses, or non-tensor inputs/outputs.
        """
        if spec.format != "onnx":
            raise EngineLoadError(f"model {spec.name!r}: the onnx engine opens ONNX files, not {spec.format}")
        check_model_file(spec)
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnx-{spec.name}")
        try:
            session, memory = executor.submit(cls._open, spec).result()
            return cls(spec, session, executor, memory)
        except BaseException:
            executor.shutdown(wait=False)
            raise

    @staticmethod
    def _open(spec: ModelSpec) -> tuple[ort.InferenceSession, int]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = _ORT_LOG_ERROR
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        with native_load_lock:
            trim_heap()
            before = resident_bytes()
            try:
                session = ort.InferenceSession(str(spec.path), sess_options=options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
                raise EngineLoadError(f"model {spec.name!r}: onnxruntime cannot load it: {exc}") from exc
            trim_heap()
            measured = resident_bytes() - before
        return session, max(measured, _ESTIMATE_FACTOR * spec.size)

    @property
    def spec(self) -> ModelSpec:
        """The spec this model was loaded from."""
        return self._spec

    @property
    def memory_bytes(self) -> int:
        """The larger of the measured resident-set growth at load and twice the file size."""
        return self._memory_bytes

    @property
    def capabilities(self) -> frozenset[str]:
        """``tensor``."""
        return frozenset({"tensor"})

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The graph's declared inputs."""
        return self._inputs

    def output_specs(self) -> tuple[TensorSpec, ...]:
        """The graph's declared outputs."""
        return self._outputs

    def validate_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``inputs`` against the declared inputs and return them as contiguous arrays.

        Raises:
            BadRequestError: an unknown or missing name, a non-array, an empty array, a wrong dtype, rank or
                dimension.
        """
        declared = {s.name: s for s in self._inputs}
        names = ", ".join(f"{s.name} {s.dtype}{_format_shape(s.shape)}" for s in self._inputs)
        unknown = sorted(set(inputs) - set(declared))
        if unknown:
            raise BadRequestError(f"model {self._spec.name!r} has no input {unknown[0]!r}; its inputs are: {names}")
        missing = sorted(set(declared) - set(inputs))
        if missing:
            raise BadRequestError(f"model {self._spec.name!r} needs input {missing[0]!r}; its inputs are: {names}")
        bound: dict[str, tuple[int, str]] = {}
        feeds: dict[str, np.ndarray] = {}
        for name, spec in declared.items():
            value = inputs[name]
            if not isinstance(value, np.ndarray):
                raise BadRequestError(f"input {name!r} must be an array, not {type(value).__name__}")
            expected = _format_shape(spec.shape)
            if spec.dtype == "object" and value.dtype.kind in "OU":
                value = value.astype(object)
            elif value.dtype != np.dtype(spec.dtype):
                raise BadRequestError(f"input {name!r} must be {spec.dtype}{expected}, got {value.dtype}")
            if value.size == 0:  # onnxruntime answers FAIL or RUNTIME_EXCEPTION, not INVALID_ARGUMENT, for these
                raise BadRequestError(f"input {name!r} is empty (shape {list(value.shape)}): it needs an element")
            if value.ndim != len(spec.shape):
                raise BadRequestError(
                    f"input {name!r} must have {len(spec.shape)} dimensions {expected}, got shape {list(value.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
                if isinstance(want, int) and want >= 0 and want != got:
                    raise BadRequestError(
                        f"input {name!r} must have shape {expected}, got {list(value.shape)} (axis {axis})"
                    )
                if isinstance(want, str):
                    size, first = bound.setdefault(want, (got, name))
                    if size != got:
                        raise BadRequestError(
                            f"dimension {want!r} is {size} in input {first!r} but {got} in input {name!r}"
                        )
            feeds[name] = np.ascontiguousarray(value)
        return feeds

    def queue_stats(self) -> dict[QueueKind, LoadStats]:
        """The queue of tensor runs now."""
        return {"tensor": self._queue.stats()}

    async def infer(
        self, inputs: Mapping[str, np.ndarray], admission: Admission | None = None
    ) -> dict[str, np.ndarray]:
        """Validate ``inputs`` (see :meth:`validate_inputs`), wait for the worker thread through the admission
        queue, run the graph, return its outputs (see :meth:`LoadedModel.infer`)."""
        admission = admission or _DEFAULT_ADMISSION
        feeds = self.validate_inputs(inputs)
        if self._closed:
            raise InferenceError(f"model {self._spec.name!r} is closed")
        run = _Run(feeds, admission.timeout_s)
        ticket = self._queue.submit(run, sum(a.nbytes for a in feeds.values()), admission.priority)
        self._start_pump()

        def deadline_error(ahead: int | None) -> DeadlineExceededError:
            where = (
                f"while waiting for the model ({ahead} requests ahead of it)"
                if ahead is not None
                else "while running (its result is discarded)"
            )
            return DeadlineExceededError(
                f"the request to model {self._spec.name!r} passed its {admission.timeout_s:g} s deadline {where}"
            )

        def abandon() -> None:  # caller gone or deadline passed: never started
            run.cancelled = True

        return await await_turn(
            self._queue, ticket, run.future, admission.timeout_s, abandon=abandon, deadline_error=deadline_error
        )

    def _start_pump(self) -> None:
        """Make sure a pump task is in the executor (event loop), so the queue is worked off."""
        with self._pump_lock:
            if self._pumping:
                return
            self._pumping = True
        try:
            self._executor.submit(self._pump)
        except RuntimeError:  # the executor was shut down: the model closed meanwhile
            with self._pump_lock:
                self._pumping = False
            self._fail_waiting()

    def _pump(self) -> None:
        """Run waiting requests one at a time until none is left (worker thread)."""
        while True:
            with self._pump_lock:  # taking and stopping under one lock: a request submitted meanwhile is
                tickets = self._queue.take(1)  # either taken here or finds _pumping False and starts a pump
                if not tickets:
                    self._pumping = False
                    return
            self._serve(tickets[0])

    def _serve(self, ticket: Ticket[_Run]) -> None:
        run = ticket.item
        try:
            if not run.future.set_running_or_notify_cancel():
                return  # the caller left, or its deadline passed, as it was taken
            if run.cancelled:
                run.future.set_exception(InferenceError(f"the request to model {self._spec.name!r} was cancelled"))
                return
            if run.deadline is not None and time.monotonic() >= run.deadline:
                run.future.set_exception(
                    DeadlineExceededError(
                        f"the request to model {self._spec.name!r} passed its {run.timeout_s:g} s deadline "
                        "while waiting for the model"
                    )
                )
                return
            try:
                run.future.set_result(self._run(run.feeds))
            except BaseException as exc:
                run.future.set_exception(exc)
        finally:
            self._queue.release(ticket)

    def _fail_waiting(self) -> None:
        """End every waiting request with "closed" (the model is closing)."""
        for ticket in self._queue.drain():
            if ticket.item.future.set_running_or_notify_cancel():
                ticket.item.future.set_exception(InferenceError(f"model {self._spec.name!r} is closed"))

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise InferenceError(f"model {self._spec.name!r} is closed")
        try:
            values = session.run(None, feeds)
        except InvalidArgument as exc:
            raise BadRequestError(f"model {self._spec.name!r} rejected the inputs: {exc}") from exc
        except AgentError:
            raise
        except Exception as exc:
            raise InferenceError(f"model {self._spec.name!r}: onnxruntime failed: {exc}") from exc
        return {spec.name: np.asarray(value) for spec, value in zip(self._outputs, values, strict=True)}

    async def aclose(self) -> None:
        """Free the session after the request running (if any); requests still waiting end with
        :class:`~agent.errors.InferenceError` ("closed"). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail_waiting()
        freed = self._executor.submit(self._free)
        try:
            await asyncio.shield(asyncio.wrap_future(freed))
        finally:
            self._executor.shutdown(wait=False)

    def _free(self) -> None:
        self._session = None
        trim_heap()
