"""Batching across requests for the local backend, as TF Serving's batch scheduler does for its clients.

Two threads per loaded model version own every request's search, one per stage, so that the
backbone of new requests and the decode steps of running ones use the two cores at the same time:

* the encoder: a request waits in a queue; the encoder encodes every waiting request's images in
  one ``encode`` call (up to ``max_batch_size`` decode rows, i.e. images x beams, counting the
  rows already decoding) once the first of them has waited ``timeout_seconds`` (about a
  millisecond) when nothing is decoding, or ``encode_wait_seconds`` when others are decoding:
  such a request could only join at the next step anyway, and the backbone costs about half as
  much per image in a batch of eight as alone, the largest part of a batched request's cost;
* the decoder: all active searches advance together: one ``decode_step`` call per iteration over
  every active request's rows, each row at its own position (the export's fixed-size decoder
  state makes rows at different positions stackable); then the searches of each kind (beam size,
  max length, length penalty) take one NumPy greedy/beam update together, each image at its own
  position (``captioner.predictor.SearchGroup``: ``StepwiseSearch``'s update, the decoders' own
  rules, for many requests at once), and a request leaves when its search is done; encoded
  requests join at the next step, without waiting for the others. The beams' reordering and the
  rows of requests that left are applied to the state and features in their own memory, copying
  only the rows that move and only the state slots written so far (a gather into new tensors moved
  the whole state on every step: a quarter of the step's cost at 16 clients); joining rows' features
  are copied into a pool behind the rows decoding, not concatenated with them;
* the caller's thread turns its finished search into the result (a few dozen small TensorFlow ops
  that would otherwise stall every other request's next step);
* a request that finds nothing decoding and no other request within the batch timeout has nobody to
  share steps with: it is decoded in its caller's thread in one graph call, as with batching off
  (stepping in Python costs more per step than the in-graph loop; ``alone_when_idle=False`` turns
  this off).

A request's caption is the one it gets alone: its rows never mix with other rows, and its search
stops on its own rule (as ``decode_images`` stops), whatever else is in the batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)
# The signature name under which a request decoded alone in one graph call is timed (as the local
# backend without batching times it).
IN_PROCESS_DECODE = "in_process_decode"

CallHook = Callable[[str, float], None]        # (signature, seconds) of each model call
BatchHook = Callable[[str, int], None]         # (signature, rows) of each model call
QueueHook = Callable[[float], None]            # seconds a request waited before it was encoded


@dataclass(eq=False)
class _Job:
    pixels: np.ndarray
    beam_size: int
    max_length: int
    length_penalty: float
    may_run_alone: bool = True
    alone: bool = False         # set by the scheduler: decode it in the caller's thread
    enqueued: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    search: object | None = None  # the finished StepwiseSearch: the caller builds the result from it
    error: BaseException | None = None
    steps: int = 0

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0]) * self.beam_size

    def finish(self, search=None, error: BaseException | None = None) -> None:
        if self.done.is_set():  # answered already: a later failure of the loop is not this request's
            return
        self.search, self.error = search, error
        self.done.set()


class BatchScheduler:
    """Encode and decode concurrent requests of one model (a ``SavedModelCaptioner``) together.

    ``decode(pixels, beam_size, max_length, length_penalty)`` blocks the calling thread until its
    result (``decode_images``' output) is ready. The encoder and decoder threads start with the first
    request and end after ``idle_seconds`` without work, so a superseded model version's threads go
    away."""

    def __init__(self, model, max_batch_size: int = 128, timeout_seconds: float = 0.001,
                 idle_seconds: float = 5.0, alone_when_idle: bool = True, encode_wait_seconds: float = 0.0,
                 in_place: bool | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.timeout_seconds = max(0.0, float(timeout_seconds))
        self.idle_seconds = idle_seconds
        self.encode_wait_seconds = max(0.0, float(encode_wait_seconds))
        self.alone_when_idle = alone_when_idle
        # Reorder and compact the loop's state and features in their own memory (see _move_rows);
        # where TensorFlow gives no writable view, gather them into new tensors.
        self.in_place = in_place_supported() if in_place is None else bool(in_place)
        self.on_call: CallHook | None = None
        self.on_batch: BatchHook | None = None
        self.on_queue: QueueHook | None = None
        # One condition for the three kinds of waiter (callers enqueueing, the encoder waiting for
        # requests or for room, the decoder waiting for encoded requests): notify_all, never notify.
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()    # waiting to be encoded
        self._ready: list = []                # [(job, StepwiseSearch)] encoded, waiting to join
        self._encoding_rows = 0               # rows of the encode call in progress
        self._decoding_rows = 0               # rows in the decode loop
        self._encoder: threading.Thread | None = None
        self._decoder: threading.Thread | None = None
        meta = model.metadata
        self._num_regions = int(meta["num_regions"])
        self._state_shape = [int(x) for x in meta["state_shape"][1:]]
        self._no_repeat_ngram_size = int(meta.get("no_repeat_ngram_size", 0))

    # -- the caller's side ---------------------------------------------------------------------
    def decode(self, pixels: np.ndarray, *, beam_size: int, max_length: int,
               length_penalty: float) -> tuple[dict[str, np.ndarray], int]:
        """``(decode output, decode steps)`` for ``pixels [B, S, S, 3]``, decoded alongside whatever
        else is in flight."""
        return self._decode(pixels, beam_size, max_length, length_penalty, self.alone_when_idle)

    def warm_up(self, pixels: np.ndarray, *, beam_size: int, max_length: int, length_penalty: float) -> None:
        """Run the step loop once, for two requests merged, before the model serves (the first
        calls of ``encode``/``decode_step`` at new batch sizes are slow)."""
        errors: list[BaseException] = []

        def run():
            try:
                self._decode(pixels, beam_size, max_length, length_penalty, False)
            except BaseException as exc:  # re-raised below: a model whose step loop fails is not served
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _decode(self, pixels, beam_size: int, max_length: int, length_penalty: float, may_run_alone: bool):
        from captioner.errors import ModelError

        slots = self._state_shape[1]
        if max_length > slots:  # checked here: past the state, decode_step fails every request in the batch
            raise ModelError(f"max_length {max_length} is longer than this export's decode state holds "
                             f"({slots} positions)", path=str(getattr(self.model, "path", "")))
        job = _Job(np.asarray(pixels, np.uint8), int(beam_size), int(max_length), float(length_penalty),
                   may_run_alone)
        with self._cond:
            self._queue.append(job)
            self._ensure_threads()
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        if job.alone:
            started = time.perf_counter()
            out = self.model.decode_pixels(job.pixels, beam_size=job.beam_size, max_length=job.max_length,
                                           length_penalty=job.length_penalty)
            if self.on_call is not None:
                self.on_call(IN_PROCESS_DECODE, time.perf_counter() - started)
            if self.on_batch is not None:
                self.on_batch(IN_PROCESS_DECODE, job.rows)
            return out, int(out["tokens"].shape[-1])
        return job.search.result(), job.steps

    def _ensure_threads(self) -> None:
        """Start the stage threads that are not running (under the lock). ``is_alive`` as well as
        None: this process may have been forked from one whose threads were running."""
        if self._queue and (self._encoder is None or not self._encoder.is_alive()):
            self._encoder = threading.Thread(target=self._encode_loop, name="batch-encoder", daemon=True)
            self._encoder.start()
        if self._ready and (self._decoder is None or not self._decoder.is_alive()):
            self._decoder = threading.Thread(target=self._decode_loop, name="batch-decoder", daemon=True)
            self._decoder.start()

    def _idle_wait(self, work: Callable[[], object]) -> bool:
        """Wait (under the lock) until ``work()`` is truthy; False after ``idle_seconds`` without."""
        deadline = time.perf_counter() + self.idle_seconds
        while not work():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            self._cond.wait(remaining)
        return True

    # -- the encoder thread --------------------------------------------------------------------
    def _encode_loop(self) -> None:
        taken: list[_Job] = []
        try:
            while True:
                taken = self._take()
                if taken is None:
                    return
                if taken:
                    self._start(taken)
                taken = []
        except BaseException as exc:  # never leave a caller waiting on an encoder that died
            log.exception("batch scheduler's encoder failed")
            with self._cond:
                pending, self._queue = list(self._queue), deque()
                self._encoding_rows = 0
                self._encoder = None
            for job in taken + pending:
                job.finish(error=exc)

    def _busy_rows(self) -> int:
        return self._decoding_rows + sum(s.rows for _, s in self._ready)

    def _take(self) -> list[_Job] | None:
        """The requests to encode now (under the lock): whatever waits, within the rows the decode
        loop has left. With nothing decoding, wait for a first request (None after
        ``idle_seconds``: the thread ends), then up to the batch timeout for more."""
        with self._cond:
            while True:
                if not self._queue and not self._idle_wait(lambda: self._queue):
                    self._encoder = None  # under the lock: a request queued after this starts a new one
                    return None
                busy = self._busy_rows()
                free = self.max_batch_size - busy
                wait = self.encode_wait_seconds if busy else self.timeout_seconds
                if wait > 0:
                    # As TF Serving's batch timeout: counted from the first waiting request's arrival.
                    deadline = self._queue[0].enqueued + wait
                    while sum(j.rows for j in self._queue) < free:
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    busy = self._busy_rows()
                    free = self.max_batch_size - busy
                taken: list[_Job] = []
                # A request larger than the whole batch still runs, on its own.
                while self._queue and (self._queue[0].rows <= free or (not busy and not taken)):
                    job = self._queue.popleft()
                    free -= job.rows
                    taken.append(job)
                if taken:
                    break
                self._cond.wait()  # no room: the decoder notifies when requests leave
            if not busy and len(taken) == 1 and taken[0].may_run_alone:
                taken[0].alone = True
            else:
                self._encoding_rows = sum(j.rows for j in taken)
        now = time.perf_counter()
        if self.on_queue is not None:
            for job in taken:
                self.on_queue(now - job.enqueued)
        if taken[0].alone:
            taken[0].finish()
            return []
        return taken

    def _start(self, jobs: list[_Job]) -> None:
        """Encode the images of ``jobs`` in one call; a search per job, handed to the decoder."""
        from captioner.predictor import StepwiseSearch

        pixels = np.concatenate([j.pixels for j in jobs]) if len(jobs) > 1 else jobs[0].pixels
        try:
            features = self._timed("encode", int(pixels.shape[0]), lambda: self.model.encode(pixels).numpy())
        except Exception as exc:
            with self._cond:
                self._encoding_rows = 0
            for job in jobs:
                job.finish(error=exc)
            return
        started, offset = [], 0
        for job in jobs:
            images = int(job.pixels.shape[0])
            try:
                search = StepwiseSearch(features[offset:offset + images], beam_size=job.beam_size,
                                        max_length=job.max_length, length_penalty=job.length_penalty,
                                        num_regions=self._num_regions,
                                        no_repeat_ngram_size=self._no_repeat_ngram_size)
            except Exception as exc:
                job.finish(error=exc)
                continue
            finally:
                offset += images
            if search.done:
                job.finish(search)
            else:
                started.append((job, search))
        with self._cond:
            self._ready += started
            self._encoding_rows = 0
            self._ensure_threads()
            self._cond.notify_all()

    # -- the decoder thread --------------------------------------------------------------------
    def _decode_loop(self) -> None:
        groups: list = []       # [SearchGroup], in row order; a group per (beam size, max length, penalty)
        jobs: dict[int, _Job] = {}  # id(search) -> its request
        arrivals: list = []
        features = state = None
        # In place: the features of every row, in row order, with room for more. This thread's own;
        # a new decoder thread starts only after this one has let go of it (under the lock).
        self._pool = None
        try:
            while True:
                with self._cond:
                    if not groups and not self._ready and not self._idle_wait(lambda: self._ready):
                        self._decoder = None  # under the lock: the encoder starts a new one
                        self._pool = None
                        return
                    arrivals, self._ready = self._ready, []
                    self._decoding_rows = sum(g.rows for g in groups) + sum(s.rows for _, s in arrivals)
                if arrivals:
                    features, state = self._join(groups, jobs, features, state, arrivals)
                    arrivals = []
                left, features, state = self._step(groups, jobs, features, state)
                groups[:] = [g for g in groups if g.members]
                if left:
                    with self._cond:
                        self._decoding_rows = sum(g.rows for g in groups)
                        self._cond.notify_all()  # room for the encoder
        except BaseException as exc:  # never leave a caller waiting on a decoder that died
            log.exception("batch scheduler's decoder failed")
            self._pool = None
            with self._cond:
                pending, self._ready = list(self._ready), []
                self._decoding_rows = 0
                self._decoder = None
                self._cond.notify_all()
            for job in list(jobs.values()) + [j for j, _ in arrivals + pending]:
                job.finish(error=exc)

    def _join(self, groups: list, jobs: dict, features, state, arrivals: list):
        """Add the encoded searches to their groups; the features and (zero) decode state of their
        rows join the loop's, reordered to the groups' row order if a search joined a group that
        is not the last."""
        import tensorflow as tf

        from captioner.predictor import SearchGroup

        old = [(g, g.rows) for g in groups]
        added: dict[int, list[int]] = {}   # id(group) -> rows of the new block, in order
        block = 0
        for job, search in arrivals:
            key = (search.beam_size, search.max_length, search.alpha, search.no_repeat_ngram_size)
            group = next((g for g in groups if g.key == key), None)
            if group is None:
                group = SearchGroup(search.beam_size, search.max_length, search.alpha, self._num_regions,
                                    search.no_repeat_ngram_size)
                groups.append(group)
            group.add(search)
            jobs[id(search)] = job
            added.setdefault(id(group), []).extend(range(block, block + search.rows))
            block += search.rows
        parts = [s.features for _, s in arrivals]
        before = sum(rows for _, rows in old)
        order, offset = [], 0
        for group in groups:
            rows = next((r for g, r in old if g is group), 0)
            order += list(range(offset, offset + rows)) + [before + i for i in added.get(id(group), [])]
            offset += rows
        order = np.asarray(order)
        identity = np.array_equal(order, np.arange(len(order)))
        if self.in_place:
            joined = self._join_in_place(features, state, parts, before, order, identity, old)
            if joined is not None:
                return joined
            self.in_place = False  # no writable host view (device memory): gather from now on
            log.info("batch scheduler: the decode state has no writable host view; rows are gathered")
        new_features = tf.constant(np.concatenate(parts) if len(parts) > 1 else parts[0])
        new_state = tf.zeros([block, *self._state_shape], tf.float32)
        if features is not None:
            new_features, new_state = tf.concat([features, new_features], 0), tf.concat([state, new_state], 0)
        if identity:
            return new_features, new_state
        return tf.gather(new_features, order), tf.gather(new_state, order)

    def _join_in_place(self, features, state, parts: list, before: int, order: np.ndarray, identity: bool,
                       old: list):
        """``_join``'s tensors, written in place: the features into the pool behind the rows decoding
        (only the new rows are copied), the state into a zero state with room for the new rows (only
        the slots written so far are copied). None where a tensor has no writable host view."""
        import tensorflow as tf

        rows = len(order)
        written = max((int(g.position.max()) for g, n in old if n), default=0)   # slots written so far
        new_state = tf.zeros([rows, *self._state_shape], tf.float32)
        target, source = _writable_view(new_state), None if state is None else _writable_view(state)
        if target is None or (state is not None and source is None):
            return None
        if source is not None and written:
            target[:before, :, :written] = source[:, :, :written]
        pool = self._pool
        if pool is None or int(pool.shape[0]) < rows:
            # Twice the rows: the pool grows a few times in a loop's life, not at every join.
            pool = tf.zeros([2 * rows, *parts[0].shape[1:]], tf.float32)
            if _writable_view(pool) is None:
                return None
            if features is not None:
                _writable_view(pool)[:before] = _writable_view(features)
            self._pool = pool
        view = _writable_view(pool)
        for part in parts:
            view[before:before + len(part)] = part
            before += len(part)
        if not identity:
            _move(view, order)
            new_state = _move_rows(new_state, order, prefix=written)
        return pool[:rows], new_state

    def _step(self, groups: list, jobs: dict, features, state):
        """One ``decode_step`` over every active row; each group advances; finished searches leave.
        Returns ``(whether any left, features, state)``."""
        import tensorflow as tf

        tokens = np.concatenate([g.tokens for g in groups])
        position = np.concatenate([g.position for g in groups])
        try:
            log_probs, attention, new_state = self._timed(
                "decode_step", len(tokens), lambda: self.model.decode_step(features, tokens, state, position))
        except Exception as exc:
            for job in jobs.values():
                job.finish(error=exc)
            jobs.clear()
            for group in groups:
                group.members.clear()
            return True, None, None
        log_probs, attention = log_probs.numpy(), attention.numpy()
        index, images, offset, left = [], [], 0, False
        for group in groups:
            rows, k = group.rows, group.beam_size
            source, finished = group.advance(log_probs[offset:offset + rows], attention[offset:offset + rows])
            index.append(source + offset)
            # The beams of an image share its features: each row keeps the features row of its own
            # beam slot, so only rows behind a request that left move (not every reordered beam).
            images.append((source // k) * k + np.arange(len(source)) % k + offset)
            for search in finished:
                job = jobs.pop(id(search))
                job.steps = search.t
                job.finish(search)
                left = True
            offset += rows
        index = np.concatenate(index)
        if not len(index):
            return left, None, None
        if self.in_place:
            # Every row's slots past its position are zeros (the step writes one slot per row and
            # rows join with a zero state), so a row's first `visible` slots are the whole row.
            state = _move_rows(new_state, index, prefix=int(position.max()) + 1)
            if left:
                _move(_writable_view(self._pool), np.concatenate(images))
                features = self._pool[:len(index)]
            return left, features, state
        # Greedy rows and beams that kept their order continue their own state: no copy.
        state = new_state if (not left and np.array_equal(index, np.arange(len(index)))) else \
            tf.gather(new_state, index)
        if left:
            features = tf.gather(features, np.concatenate(images))
        return left, features, state

    def _timed(self, signature: str, rows: int, call: Callable):
        started = time.perf_counter()
        out = call()
        if self.on_call is not None:
            self.on_call(signature, time.perf_counter() - started)
        if self.on_batch is not None:
            self.on_batch(signature, rows)
        return out


def _writable_view(tensor) -> np.ndarray | None:
    """The memory of an eager host tensor as a writable NumPy array (no copy), or None where this
    TensorFlow gives none (``numpy()`` copies; ``_numpy()`` is the view it wraps; a GPU tensor's
    would be a copy, and writes to it lost)."""
    view = getattr(tensor, "_numpy", None)
    if view is None or "CPU" not in str(getattr(tensor, "backing_device", "")):
        return None
    try:
        array = view()
    except Exception:  # not on the host, or a dtype without a NumPy view
        return None
    return array if isinstance(array, np.ndarray) and array.flags.writeable else None


def in_place_supported() -> bool:
    """Whether ``_move_rows`` can write through ``_writable_view``: a write through the view shows
    in the tensor, and a leading-rows slice keeps the tensor's memory (TensorFlow's aligned
    dim-0 slice). Checked once per process on a fresh tensor."""
    global _IN_PLACE
    if _IN_PLACE is None:
        import tensorflow as tf

        probe = tf.fill([4, 64], np.float32(0))
        view = _writable_view(probe)
        ok = view is not None
        if ok:
            view[1, 3] = 5.0
            head = _writable_view(probe[:2])
            ok = float(probe[1, 3]) == 5.0 and head is not None and head.ctypes.data == view.ctypes.data
        _IN_PLACE = ok
    return _IN_PLACE


_IN_PLACE: bool | None = None


def _move_rows(tensor, index: np.ndarray, prefix: int | None = None):
    """``tf.gather(tensor, index)`` for ``index`` that maps rows into the first ``len(index)`` rows,
    written in place into ``tensor`` (which nothing else may hold): only the rows whose source is
    another row are copied, only their first ``prefix`` entries along axis 2 when given, and the
    result is the leading-rows slice (the same memory). The decode loop's own tensors only: a
    state that a ``decode_step`` call returned or ``_join`` built. A tensor without a writable host
    view is gathered."""
    if not np.array_equal(index, np.arange(len(index))):
        view = _writable_view(tensor)
        if view is None:
            import tensorflow as tf

            return tf.gather(tensor, index)
        _move(view, index, prefix)
    return tensor if len(index) == int(tensor.shape[0]) else tensor[:len(index)]


def _move(view: np.ndarray, index: np.ndarray, prefix: int | None = None) -> None:
    """``view[i] = view[index[i]]`` for the rows where that changes something (the right side is
    read first, so overlapping moves are safe), the first ``prefix`` entries along axis 2 only when
    given."""
    rows = np.flatnonzero(index != np.arange(len(index)))
    if not len(rows):
        return
    if prefix is None:
        view[rows] = view[index[rows]]
    else:
        view[rows, :, :prefix] = view[index[rows], :, :prefix]
