"""icd_client: a thin Python client of icd.v1.PermutationService.

Every method is one RPC. Requests are built from plain Python values; most
methods return the service's own response messages (see
proto/icd/v1/permutation.proto for their fields), ``evaluate`` returns a dict
with numpy logits, ``read_tensors``/``write_tensors`` move numpy arrays,
``compute_permutation`` streams numpy activation traces.
Errors are raised as :class:`IcdError` (``code`` is the gRPC status name,
e.g. ``"INVALID_ARGUMENT"``).

    from icd_client import Client
    with Client("127.0.0.1:50051") as c:
        c.load("m", "mamba1-small/hf")
        perms = c.random_permutations(c.symmetries("m"), seed=7)
        report = c.apply("m", perms)
        print(report.version, report.correctness.rel_l2)

        results = c.capture_permutation("m", np.random.randint(0, 128, (4, 256)))
        print(summarize(results))
        c.apply("m", {r.permutation.group: r.permutation.index for r in results})

        timing = c.measure_latency("m", compare_model="m-original", mode="decode")
        print(timing.median_ms, timing.ratio, timing.ratio_ci95_low, timing.ratio_ci95_high)

Needs Debian's python3-grpcio, python3-protobuf and python3-numpy, i.e. the
system interpreter /usr/bin/python3. Installed with pip (client/python/
pyproject.toml: ``pip install --no-build-isolation client/python`` into a venv
made with --system-site-packages), the generated stubs (icd/v1/
permutation_pb2*.py) come with it. In a source tree they are built, not
committed: ``cmake --build build --target icd_python_stubs`` writes them to
build/client/python/gen. They are found on sys.path, else in
$ICD_PYTHON_STUBS, else in <repo>/build/client/python/gen.
"""

import os
import sys
import threading
import uuid

import grpc
import numpy as np

__all__ = ["Client", "IcdError", "graph", "random_permutations", "summarize"]


def _import_stubs():
    try:
        from icd.v1 import permutation_pb2, permutation_pb2_grpc  # noqa: F401
        return permutation_pb2, permutation_pb2_grpc
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    candidates = [os.environ.get("ICD_PYTHON_STUBS"),
                  os.path.join(repo, "build", "client", "python", "gen")]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "icd", "v1", "permutation_pb2.py")):
            sys.path.insert(0, path)
            from icd.v1 import permutation_pb2, permutation_pb2_grpc  # noqa: F811
            return permutation_pb2, permutation_pb2_grpc
    raise ImportError(
        "icd_client: generated stubs icd/v1/permutation_pb2.py not found; build them "
        "with `cmake --build build --target icd_python_stubs` and put "
        "build/client/python/gen on PYTHONPATH (or set ICD_PYTHON_STUBS)")


pb, pb_grpc = _import_stubs()


class IcdError(Exception):
    """A failed call: ``code`` is the status name ("NOT_FOUND", ...),
    ``status`` the grpc.StatusCode, ``message`` the server's message."""

    def __init__(self, code, message, status=None):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.status = status


def _error(err):
    """The one mapping of a grpc.RpcError to IcdError."""
    status = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return IcdError(status.name, details or "", status)


# ---------------------------------------------------------------- dtypes

# Wire dtype -> (little-endian wire type, native numpy type).
_NUMPY = {"float32": (np.dtype("<f4"), np.float32), "float64": (np.dtype("<f8"), np.float64),
          "float16": (np.dtype("<f2"), np.float16)}


def _bf16_to_f32(raw):
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32)


def _f32_to_bf16(array):
    """float32 -> bfloat16 bits (round to nearest even; NaN stays NaN)."""
    bits = np.ascontiguousarray(array, dtype="<f4").view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    out = (rounded >> 16).astype("<u2")
    nan = np.isnan(array.astype(np.float32, copy=False)).reshape(out.shape)
    out[nan] = np.uint16(0x7FC0)
    return out


def _decode(dtype, shape, raw):
    if dtype == "bfloat16":
        values = _bf16_to_f32(raw)
    elif dtype in _NUMPY:
        wire, native = _NUMPY[dtype]
        values = np.frombuffer(raw, dtype=wire).astype(native)  # a writable copy
    else:
        raise IcdError("INTERNAL", "unknown tensor dtype %r" % dtype)
    return values.reshape(tuple(shape))


def _encode(array, dtype):
    array = np.asarray(array)
    if dtype == "bfloat16":
        return _f32_to_bf16(array.astype(np.float32, copy=False)).tobytes()
    if dtype not in _NUMPY:
        raise IcdError("INVALID_ARGUMENT", "unknown tensor dtype %r" % dtype)
    return np.ascontiguousarray(array, dtype=_NUMPY[dtype][0]).tobytes()


# ---------------------------------------------------------------- random permutations

_MASK = (1 << 64) - 1


class _SplitMix64:
    """The same generator as icdctl's (client/cpp/icdctl_permutations.h)."""

    def __init__(self, seed):
        self.state = seed & _MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def shuffle(self, items):
        for i in range(len(items), 1, -1):
            j = self.next() % i
            items[i - 1], items[j] = items[j], items[i - 1]


def _random_group(group, rng):
    n = group.size
    b = group.block if group.block > 0 else n
    w = group.whole if group.whole > 0 else 1
    if n <= 0 or n % b or b % w:
        raise IcdError("INVALID_ARGUMENT",
                       "group '%s': cannot draw a permutation for size %d, block %d, whole %d"
                       % (group.name, n, group.block, group.whole))
    chunks = b // w
    index = [0] * n
    for block in range(n // b):
        order = list(range(chunks))
        rng.shuffle(order)
        for c in range(chunks):
            inner = list(range(w))
            rng.shuffle(inner)
            out = (block * chunks + c) * w
            src = (block * chunks + order[c]) * w
            for i in range(w):
                index[out + i] = src + inner[i]
    return np.asarray(index, dtype=np.int64)


def random_permutations(symmetries, seed, groups=None):
    """A random valid permutation of every group of ``symmetries`` (a
    Symmetries message), or of ``groups`` (names, in that order), respecting
    block and whole. Returns an ordered dict name -> int64 array; the same
    seed gives the same permutations as ``icdctl apply --random SEED``."""
    by_name = {g.name: g for g in symmetries.groups}
    if groups is None:
        chosen = list(symmetries.groups)
    else:
        missing = [name for name in groups if name not in by_name]
        if missing:
            raise IcdError("INVALID_ARGUMENT", "unknown group(s): %s" % ", ".join(missing))
        chosen = [by_name[name] for name in groups]
    rng = _SplitMix64(seed)
    return {g.name: _random_group(g, rng) for g in chosen}


# ---------------------------------------------------------------- traces

_SOLVER_FIELDS = ("objective", "statistic", "activation_quantile", "resolution", "seed",
                  "seeds", "nm_n", "nm_m", "preserve_block", "block_sizes", "return_graph")


def _solver_options(solver):
    """SolverOptions from keyword arguments named as its fields; unset ones
    stay zero, i.e. the server's defaults."""
    unknown = sorted(set(solver) - set(_SOLVER_FIELDS))
    if unknown:
        raise TypeError("unknown solver option(s) %s; SolverOptions has %s"
                        % (", ".join(unknown), ", ".join(_SOLVER_FIELDS)))
    fields = dict(solver)
    if "block_sizes" in fields:
        fields["block_sizes"] = [int(b) for b in fields["block_sizes"]]
    return pb.SolverOptions(**fields)


def _row_blocks(rows):
    """The 2-D pieces of ``rows``: the array itself, or each item of an
    iterable of arrays, taken lazily."""
    if isinstance(rows, np.ndarray):
        yield rows
        return
    for block in rows:
        yield np.asarray(block)


def _trace_chunks(header, rows, chunk_rows, chunk_bytes):
    """TraceChunk stream: the header, then [n, channels] pieces of at most
    ``chunk_rows`` rows (default: what fits in ``chunk_bytes``), each converted
    to little-endian float32 only when it is sent. ``header.channels`` comes
    from the first block."""
    step = None
    for block in _row_blocks(rows):
        if block.ndim != 2:
            raise IcdError("INVALID_ARGUMENT", "trace rows are 2-D [rows, channels]; got "
                           "shape %s" % (block.shape,))
        if not np.issubdtype(block.dtype, np.floating):
            raise IcdError("INVALID_ARGUMENT", "trace rows are floating point; got %s"
                           % block.dtype)
        if block.shape[1] == 0:
            raise IcdError("INVALID_ARGUMENT", "trace rows have no channels")
        if step is None:
            header.channels = block.shape[1]
            step = int(chunk_rows) if chunk_rows else max(1, chunk_bytes // (4 * block.shape[1]))
            yield pb.TraceChunk(header=header)
        elif block.shape[1] != header.channels:
            raise IcdError("INVALID_ARGUMENT", "a block of %d channels after blocks of %d"
                           % (block.shape[1], header.channels))
        for start in range(0, block.shape[0], step):
            piece = np.ascontiguousarray(block[start:start + step], dtype="<f4")
            yield pb.TraceChunk(rows=piece.shape[0], f32_le=piece.tobytes())
    if step is None:
        raise IcdError("INVALID_ARGUMENT", "no trace rows")


def _fmt(value, digits=3):
    return "%.*g" % (digits, value)


class _Unwatched:
    """What a call without ``progress`` uses: the client's own metadata."""

    def __init__(self, metadata):
        self.metadata = metadata

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _ProgressWatch:
    """Follows one call: it carries a fresh x-icd-request-id, and a thread
    polls GetProgress every ``interval`` seconds, handing each change to
    ``callback`` (a Progress message); the finished state comes last, on the
    caller's thread, before the call's result is returned. A callback that
    raises stops the reports, not the call. For tqdm:

        bar = tqdm()
        def show(p):
            bar.set_description(p.stage)
            bar.total = p.total or None
            bar.n = p.done
            bar.refresh()
    """

    def __init__(self, client, callback, interval=0.2):
        self._client, self._callback, self._interval = client, callback, interval
        self.request_id = uuid.uuid4().hex
        self.metadata = tuple(client._metadata or ()) + (("x-icd-request-id", self.request_id),)
        self._stop = threading.Event()
        self._last = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self):
        try:
            now = self._client._stub.GetProgress(
                pb.ProgressRequest(request_id=self.request_id), timeout=10,
                metadata=self._client._metadata)
        except grpc.RpcError:
            return  # not begun yet, or the server is busy: the next poll
        key = (now.stage, now.done, now.total, now.finished)
        if key != self._last and self._callback is not None:
            self._last = key
            try:
                self._callback(now)
            except Exception:  # noqa: BLE001 (the caller's bug must not fail the call)
                self._callback = None

    def _run(self):
        while not self._stop.wait(self._interval):
            self._poll()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll()  # the finished state
        return False


def graph(result, solved=False):
    """The statistic's graph the solver clustered, from a PermutationResult
    asked for with ``return_graph=True`` (capture_permutation or
    compute_permutation): float32 [size, size] in the group's channel order
    before the permutation, or with ``solved`` in the order it produces (rows
    and columns taken by ``permutation.index``). None when the result has
    none."""
    raw = result.graph_f32_le
    if not raw:
        return None
    values = np.frombuffer(raw, dtype="<f4")
    size = int(round(np.sqrt(values.size)))
    if size * size != values.size:
        raise IcdError("INTERNAL", "graph_f32_le holds %d floats, not a square" % values.size)
    matrix = values.reshape(size, size)
    if solved:
        index = np.asarray(result.permutation.index, dtype=np.int64)
        matrix = matrix[np.ix_(index, index)]
    return matrix


def summarize(results):
    """A readable table of PermutationResult messages (one, a list, or a
    PermutationSet): per group Q and its null, whether structure was found,
    clusters, ARI across seeds, blocks touched identity -> solved per block
    size, N:M efficacy (nm_sparsity only), rows used (+ held out) and ms."""
    if hasattr(results, "results"):
        results = list(results.results)
    elif hasattr(results, "permutation"):
        results = [results]
    sizes = []
    for r in results:
        for b in r.blocks:
            if b.block not in sizes:
                sizes.append(b.block)
    any_nm = any(r.nm_upper_bound > 0 for r in results)
    header = ["GROUP", "Q", "NULL Q", "STRUCTURE", "CLUSTERS", "ARI"]
    header += ["BLOCKS@%d" % b for b in sizes] + (["N:M"] if any_nm else []) + ["TOKENS", "MS"]
    table = [header]
    for r in results:
        blocks = {b.block: "%s -> %s" % (_fmt(b.identity), _fmt(b.solved)) for b in r.blocks}
        row = [r.permutation.group, _fmt(r.modularity), _fmt(r.modularity_null),
               "yes" if r.structure_found else "no", str(r.clusters),
               _fmt(r.ari) if r.ari else "-"]
        row += [blocks.get(b, "-") for b in sizes]
        if any_nm:
            row.append("%s%%" % _fmt(100 * r.nm_efficacy) if r.nm_upper_bound > 0 else "-")
        row += ["%d + %d" % (r.tokens, r.holdout_tokens), _fmt(r.solve_ms, 4)]
        table.append(row)
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    lines.append("Q vs NULL Q: modularity of the clusters found and of shuffled rows; "
                 "STRUCTURE no: no gain claimed.")
    lines.append("BLOCKS@b: blocks touched per held-out row, identity -> solved (lower is "
                 "better). TOKENS: rows + held-out rows.")
    return "\n".join(lines)


# ---------------------------------------------------------------- client

def _encode_health_request(service):
    data = service.encode()
    if not data:
        return b""
    out = bytearray([0x0A])
    n = len(data)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


class Client:
    """A connection to icd-server.

    address: "host:port". token: sent as ``authorization: Bearer <token>``.
    timeout: default deadline of each call in seconds (None: none).
    connect_timeout: seconds to wait for the channel (None: connect lazily).
    """

    def __init__(self, address, token=None, timeout=None, connect_timeout=10.0,
                 max_message_mb=256, credentials=None, chunk_bytes=(1 << 20) - (64 << 10)):
        limit = max(1, int(max_message_mb)) * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit),
                   ("grpc.max_send_message_length", limit)]
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.PermutationServiceStub(self._channel)
        self._metadata = (("authorization", "Bearer " + token),) if token else None
        self._timeout = timeout
        self._chunk_bytes = max(1, int(chunk_bytes))
        if connect_timeout:
            try:
                grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
            except grpc.FutureTimeoutError:
                self._channel.close()
                raise IcdError("UNAVAILABLE", "could not connect to %s within %g s"
                               % (address, connect_timeout), grpc.StatusCode.UNAVAILABLE)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request, timeout=None, metadata=None):
        try:
            return method(request, timeout=timeout or self._timeout,
                          metadata=metadata or self._metadata)
        except grpc.RpcError as err:
            raise _error(err) from None

    def _watched(self, progress):
        """A _ProgressWatch for a call (``progress``: a callback), or a no-op
        context whose metadata is the client's own."""
        return _ProgressWatch(self, progress) if progress else _Unwatched(self._metadata)

    def progress(self, request_id):
        """GetProgress -> Progress(request_id, rpc, stage, done, total,
        elapsed_s, finished, code) of a call that carried that ID (the
        ``progress=`` argument of the long calls does this for you)."""
        return self._call(self._stub.GetProgress, pb.ProgressRequest(request_id=request_id))

    # -- health

    def health(self, service=""):
        """grpc.health.v1.Health/Check (no token needed): True when SERVING."""
        check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            raw = check(_encode_health_request(service), timeout=self._timeout or 10.0)
        except grpc.RpcError as err:
            raise _error(err) from None
        # HealthCheckResponse{ServingStatus status = 1}; SERVING = 1.
        return raw == b"\x08\x01"

    # -- models

    def load(self, name, path, device="", dtype="", progress=None, placement=""):
        """LoadModel -> ModelInfo (name, family, layout, device, dtype,
        parameters, version, fingerprint, dims, path, placement). ``progress``:
        a callback taking Progress messages while it runs (weight files read).
        ``placement`` instead of ``device`` spreads the layers over several
        devices: "auto" or "cuda:0=0-31,cuda:1=32-63"."""
        with self._watched(progress) as watch:
            return self._call(self._stub.LoadModel, pb.LoadModelRequest(
                name=name, path=path, device=device, dtype=dtype, placement=placement),
                metadata=watch.metadata)

    def models(self):
        """ListModels -> list of ModelInfo."""
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest()).models)

    def unload(self, name):
        self._call(self._stub.UnloadModel, pb.UnloadModelRequest(name=name))

    def symmetries(self, name):
        """GetSymmetries -> Symmetries(model, groups[name, size, block, whole,
        members], version)."""
        return self._call(self._stub.GetSymmetries, pb.GetSymmetriesRequest(model=name))

    random_permutations = staticmethod(random_permutations)

    # -- apply, verify, evaluate

    def apply(self, name, permutations, expected_version=0, skip_verify=False):
        """ApplyPermutation -> ApplyReport(version, correctness, apply_ms,
        groups, verified, verify_ms). ``permutations``: a dict group -> indices
        (applied in the dict's order), a list of (group, indices), or a list of
        Permutation / PermutationResult messages (what compute_permutation and
        capture_permutation return); indices are a numpy array or a list of
        ints (gathers: new j holds old p[j])."""
        items = permutations.items() if hasattr(permutations, "items") else permutations
        request = pb.ApplyRequest(model=name, skip_verify=skip_verify,
                                  expected_version=int(expected_version))
        for item in items:
            item = getattr(item, "permutation", item)
            group, index = (item.group, item.index) if hasattr(item, "group") else item
            request.permutations.add(
                group=group, index=np.asarray(index, dtype=np.int64).ravel().tolist())
        return self._call(self._stub.ApplyPermutation, request)

    def verify(self, name):
        """Verify -> CorrectnessReport(ok, rel_l2, max_abs, max_rel,
        top1_agreement, tolerance, tokens)."""
        return self._call(self._stub.Verify, pb.VerifyRequest(model=name))

    def evaluate(self, name, input_ids, batch=None, return_logits=False):
        """Evaluate. ``input_ids``: a [batch, seq] array, or a flat list with
        ``batch``. Returns {"mean_nll", "tokens", "shape", "logits"}; logits is
        a float32 array [batch, seq, vocab] with return_logits, else None."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if batch is None:
            batch = ids.shape[0] if ids.ndim == 2 else 1
        response = self._call(self._stub.Evaluate, pb.EvaluateRequest(
            model=name, input_ids=ids.ravel().tolist(), batch=int(batch),
            return_logits=return_logits))
        shape = tuple(response.shape)
        logits = None
        if return_logits:
            logits = np.asarray(response.logits, dtype=np.float32).reshape(shape)
        return {"mean_nll": response.mean_nll, "tokens": response.tokens,
                "shape": shape, "logits": logits}

    # -- tensors

    def read_tensors(self, name, names=None):
        """ReadTensors -> dict name -> numpy array (float32, float64, float16;
        bfloat16 comes back widened to float32, exactly). ``names``: None for
        every tensor."""
        stream = self._stub.ReadTensors(
            pb.ReadTensorsRequest(model=name, names=list(names or [])),
            timeout=self._timeout, metadata=self._metadata)
        out, parts, current = {}, [], None
        try:
            for chunk in stream:
                if current is None:
                    current = chunk
                elif chunk.name != current.name:
                    raise IcdError("INTERNAL", "chunk of %s inside tensor %s"
                                   % (chunk.name, current.name))
                parts.append(chunk.data)
                if chunk.last:
                    out[current.name] = _decode(current.dtype, current.shape, b"".join(parts))
                    parts, current = [], None
        except grpc.RpcError as err:
            raise _error(err) from None
        if current is not None:
            raise IcdError("INTERNAL", "stream ended inside tensor %s" % current.name)
        return out

    def write_tensors(self, name, tensors, expected_version=0, dtype=None):
        """WriteTensors: replace named tensors (same shapes and dtypes), all or
        nothing; returns the new version. ``tensors``: dict name -> array.

        The wire dtype of each tensor is ``dtype`` (a str, or a dict name ->
        str) when given; otherwise float64/float16 arrays go as they are and
        float32 arrays go as the model's dtype (ModelInfo.dtype, one
        ListModels call): a bfloat16 model gets its float32 arrays rounded to
        bfloat16 (nearest even), the exact inverse of read_tensors' widening."""
        model_dtype = None

        def wire_dtype(tensor_name, array):
            nonlocal model_dtype
            if isinstance(dtype, dict) and tensor_name in dtype:
                return dtype[tensor_name]
            if isinstance(dtype, str):
                return dtype
            if array.dtype == np.float64:
                return "float64"
            if array.dtype == np.float16:
                return "float16"
            if model_dtype is None:
                found = [m.dtype for m in self.models() if m.name == name]
                if not found:
                    raise IcdError("NOT_FOUND", "model '%s' is not loaded" % name,
                                   grpc.StatusCode.NOT_FOUND)
                model_dtype = found[0]
            return model_dtype if model_dtype in ("bfloat16", "float16") else "float32"

        def chunks():
            first = True
            for tensor_name, array in tensors.items():
                array = np.asarray(array)
                wire = wire_dtype(tensor_name, array)
                raw = _encode(array, wire)
                pos = 0
                while True:
                    piece = raw[pos:pos + self._chunk_bytes]
                    pos += len(piece)
                    chunk = pb.TensorChunk(name=tensor_name, shape=list(array.shape),
                                           dtype=wire, data=piece, last=pos >= len(raw))
                    if first:
                        chunk.model = name
                        chunk.expected_version = int(expected_version)
                        first = False
                    yield chunk
                    if pos >= len(raw):
                        break
            if first:  # no tensors: still name the model
                yield pb.TensorChunk(model=name, expected_version=int(expected_version))

        # Encode (and look up the model's dtype) before the stream opens, so a
        # client-side error never leaves a half-sent stream.
        prepared = list(chunks())
        report = self._call(self._stub.WriteTensors, iter(prepared))
        return report.version

    # -- traces

    def compute_permutation(self, model, group, rows, holdout_rows=0, chunk_rows=None,
                            progress=None, **solver):
        """ComputePermutation -> PermutationResult: a permutation of ``group``
        from activation traces, whose ``permutation`` applies as is with
        ``apply``.

        ``rows``: a 2-D float array [rows, channels] (channels = the group's
        size), or an iterable of such arrays (a generator reading a file, say),
        consumed lazily: each piece is converted to float32 and sent in chunks
        of ``chunk_rows`` rows (default: about ``chunk_bytes``, 1 MiB), so a
        huge trace is never held twice. The last ``holdout_rows`` rows are held
        out for scoring (0: min(1024, rows / 5)). ``solver``: SolverOptions
        fields (objective="nm_sparsity", statistic="pmi", seeds=5, nm_n=2,
        nm_m=4, block_sizes=[16, 64], ...). A client-side error (a bad piece)
        cancels the call and is raised; the server keeps nothing.
        ``progress``: a callback taking Progress messages (rows received,
        then the solve)."""
        header = pb.TraceHeader(model=model, group=group, holdout_rows=int(holdout_rows),
                                solver=_solver_options(solver))
        failure, call, started = [], [], threading.Event()

        def chunks():
            # An error here cancels the call (the server keeps nothing) and is
            # raised to the caller; raising inside gRPC's request thread would
            # be logged and reported as CANCELLED instead.
            started.wait()
            try:
                yield from _trace_chunks(header, rows, chunk_rows, self._chunk_bytes)
            except Exception as err:  # noqa: BLE001 (re-raised below)
                failure.append(err)
                call[0].cancel()

        with self._watched(progress) as watch:
            call.append(self._stub.ComputePermutation.future(
                chunks(), timeout=self._timeout, metadata=watch.metadata))
            started.set()
            try:
                return call[0].result()
            except (grpc.RpcError, grpc.FutureCancelledError) as err:
                if failure:
                    raise failure[0] from None
                raise _error(err) from None

    def capture_permutation(self, model, input_ids, batch=None, holdout_ids=None, groups=None,
                            progress=None, **solver):
        """CapturePermutation -> list of PermutationResult, one per group (in
        ``groups`` order, or every group in GetSymmetries order). The server
        runs the model on ``input_ids`` ([batch, seq] array, or flat with
        ``batch``; None: rows of a 2-D array, else 1), records each group's
        activations, solves, and scores on ``holdout_ids`` (same batch; None:
        the last fifth of every sequence). ``solver`` as for compute_permutation.
        ``progress``: a callback taking Progress messages (stage "forward",
        then "solve", counted in groups)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if batch is None:
            batch = ids.shape[0] if ids.ndim == 2 else 1
        request = pb.CaptureRequest(model=model, input_ids=ids.ravel().tolist(),
                                    batch=int(batch), groups=list(groups or []),
                                    solver=_solver_options(solver))
        if holdout_ids is not None:
            request.holdout_ids.extend(np.asarray(holdout_ids, dtype=np.int64).ravel().tolist())
        with self._watched(progress) as watch:
            return list(self._call(self._stub.CapturePermutation, request,
                                   metadata=watch.metadata).results)

    summarize = staticmethod(summarize)

    # -- latency

    def measure_latency(self, model, compare_model=None, mode="prefill", batch=1, seq_len=128,
                        warmup=3, iters=20, eager=False, counter_repeats=0, progress=None):
        """MeasureLatency -> LatencyReport(median_ms, p10_ms, p90_ms,
        ci95_low_ms, ci95_high_ms, samples, device, method, execution,
        version, compare, ratio, ratio_ci95_low, ratio_ci95_high). On a GPU
        a decode step is replayed as one CUDA graph (execution "cuda_graph");
        ``eager`` launches its kernels one by one. The server times its forward on
        token ids it draws: "prefill", one forward over [batch, seq_len] per
        sample; "decode", one single-token step of the batch per sample after
        an untimed prefill of seq_len tokens. ``warmup`` samples are
        discarded. With ``compare_model`` both run in interleaved rounds;
        ``compare`` is its report and ``ratio`` the median of t(model) /
        t(compare_model) over the rounds, with its 95% interval. ``progress``:
        a callback taking Progress messages ("warmup", then "samples").
        ``counter_repeats`` (CUDA): one more sample of each model (a decode
        step launched eagerly) run that many times under the GPU's hardware
        counters; ``counters`` in each report: DRAM bytes read and written, L2
        sectors and hit rate per kernel (``kernels``), in all (``total``) and
        per repeat (``repeat_totals``)."""
        with self._watched(progress) as watch:
            return self._call(self._stub.MeasureLatency, pb.LatencyRequest(
                model=model, compare_model=compare_model or "", mode=mode, batch=int(batch),
                seq_len=int(seq_len), warmup=int(warmup), iters=int(iters), eager=bool(eager),
                counter_repeats=int(counter_repeats)),
                metadata=watch.metadata)

    # -- export

    def export(self, name, path):
        """ExportModel -> ExportReport(path, files, version)."""
        return self._call(self._stub.ExportModel, pb.ExportRequest(model=name, path=path))
