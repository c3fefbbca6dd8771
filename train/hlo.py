"""Reading the text of a compiled XLA program (``compiled.as_text()``): the collectives it runs and
the bytes each device sends for them, the Pallas kernels it calls, the matmuls whose source line is
in a given file, and the largest buffers of the memory-usage report XLA dumps. For ``train.compile``.

Bytes sent per device, per collective over a group of p devices, under the standard ring
algorithms (the same in a bidirectional ring, which halves the time, not the bytes); ``B`` is the
bytes of the operand one device holds:

- all-gather: (p - 1) B, i.e. (p - 1)/p of the gathered result;
- reduce-scatter: (p - 1)/p B (B is the whole operand, each device keeps B/p);
- all-reduce: 2 (p - 1)/p B (a reduce-scatter, then an all-gather);
- all-to-all: (p - 1)/p B (each device keeps one p-th of its operand);
- collective-permute: B (each device sends its buffer once).

libtpu's compiled programs show collectives in forms that are not one HLO op per collective: an
asynchronous all-gather is split into a start fusion, continuation fusions and a done fusion, each
holding a copy of the ``all-gather`` with the same ``channel_id`` and ``chain_id``, which count as
one collective; a reduce-scatter may be a custom fusion named ``all-reduce-scatter.N`` around an
``all-reduce`` and a slice, which counts as a reduce-scatter. Other rewrites count as what they
became: a small reduce-scatter turned into an all-reduce and a slice, or an all-gather over many
devices (64 on v5p:4x4x4) into an all-reduce of a zero-padded buffer, count as all-reduces, as
the chips run them. Collectives inside a ``while`` body count once per iteration when the loop's
condition is ``counter < constant`` and the counter starts at a constant (the form ``lax.scan`` and
``fori_loop`` take, also after XLA peels an iteration out); otherwise once, and the loop is listed in
``Collectives.unknown_loops``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OPCODE_KIND = {"all-gather": "all-gather", "all-gather-start": "all-gather",
                "reduce-scatter": "reduce-scatter", "all-reduce": "all-reduce",
                "all-reduce-start": "all-reduce", "all-to-all": "all-to-all",
                "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
                "collective-permute-start": "collective-permute"}
# bytes per element; sub-byte types count as fractions
_DTYPE_BYTES = {"pred": 1.0, "bf16": 2.0, "token": 0.0}
_SHAPE = re.compile(r"\b(bf16|f8e\w+|f4e\w+|pred|token|[sufc]\d+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"\s+(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<rest>.*)$")
_HEADER = re.compile(r"(?:ENTRY )?%?(?P<name>[\w.\-]+) .*\{$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations|"
                      r"true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)")


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of an HLO element type (``bf16`` 2, ``f32`` 4, ``s4`` 0.5, ``f8e4m3fn`` 1)."""
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if dtype.startswith(("f8", "f4")):
        return int(dtype[1]) / 8
    return int(dtype[1:]) / 8


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape as printed (``f32[4,8]{1,0}``, or a tuple of them), layouts ignored."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * dtype_bytes(dtype)
               for dtype, dims in _SHAPE.findall(shape))


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    computation: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    args: str  # the text between the opcode's parentheses (a constant's literal)
    attrs: str


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def _instruction(name: str, computation: str, rest: str) -> Instruction | None:
    """An instruction from the text after ``name = `` (shape, opcode, operands, attributes)."""
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    shape, tail = rest[:end], rest[end:].lstrip()
    opcode = re.match(r"([\w\-]+)\(", tail)
    if opcode is None:
        return None
    close = _balanced(tail, opcode.end() - 1)
    args = tail[opcode.end():close - 1]
    operands = tuple(re.findall(r"%([\w.\-]+)", args))
    return Instruction(name, computation, shape, opcode.group(1), operands, args, tail[close:])


class Program:
    """The computations and instructions of a compiled HLO module's text, and its source table."""

    def __init__(self, text: str):
        self.instructions: list[Instruction] = []
        self.entry = ""
        self.num_partitions = int((re.search(r"num_partitions=(\d+)", text) or [0, 1])[1])
        computation, pending = "", None
        for line in text.splitlines():
            header = _HEADER.match(line) if line.startswith(("%", "ENTRY ")) else None
            match = None if header else _INSTRUCTION.match(line)
            if header or match or line == "}":  # an instruction may run over several lines
                self._add(pending)
                pending = None
            if header:
                computation = header.group("name")
                self.entry = computation if line.startswith("ENTRY") else self.entry
            elif match:
                pending = (match.group("name"), computation, match.group("rest"))
            elif pending is not None:
                pending = (pending[0], pending[1], pending[2] + "\n" + line)
        self._add(pending)
        self.by_name = {i.name: i for i in self.instructions}
        self.frames = _source_frames(text)
        self.runs, self.unknown_loops = self._executions()

    def _add(self, pending: tuple[str, str, str] | None) -> None:
        if pending is not None and (instruction := _instruction(*pending)) is not None:
            self.instructions.append(instruction)

    def _executions(self) -> tuple[dict[str, float], tuple[str, ...]]:
        """(how many times each computation runs per run of the entry computation, the while loops
        whose trip count could not be read and were counted once)."""
        callers: dict[str, list[tuple[Instruction, bool]]] = {}
        for i in self.instructions:
            for how, names in _CALLEES.findall(i.attrs):
                for callee in re.findall(r"%?([\w.\-]+)", names):
                    callers.setdefault(callee, []).append((i, how == "body"))
        counts: dict[str, float] = {self.entry: 1.0}
        unknown: list[str] = []

        def count(name: str, seen: frozenset[str]) -> float:
            if name in counts:
                return counts[name]
            total = 0.0
            for site, is_body in callers.get(name, []):
                if site.computation in seen:
                    continue
                trips = 1.0
                if is_body:
                    trips = self.trip_count(site)
                    if trips is None:
                        unknown.append(site.name)
                        trips = 1.0
                total += count(site.computation, seen | {name}) * trips
            counts[name] = total
            return total

        for computation in {i.computation for i in self.instructions}:
            count(computation, frozenset())
        return counts, tuple(sorted(set(unknown)))

    def trip_count(self, loop: Instruction) -> float | None:
        """Iterations of a ``while`` whose condition is ``counter < constant`` and whose counter
        starts at a constant: 0 as ``lax.scan`` and ``fori_loop`` write it, or 1 after XLA peels an
        iteration out of the loop (its collective pipeliner does, on TPU)."""
        condition = re.search(r"condition=%?([\w.\-]+)", loop.attrs)
        if condition is None:
            return None
        body = [i for i in self.instructions if i.computation == condition.group(1)]
        root = next((i for i in body if i.opcode == "compare" and "direction=LT" in i.attrs), None)
        if root is None or len(root.operands) != 2:
            return None
        bound, start = self.constant(root.operands[1]), self.loop_start(loop, root.operands[0])
        return None if bound is None or start is None else float(max(bound - start, 0))

    def constant(self, name: str) -> int | None:
        """The value of an integer scalar ``constant`` (through copies), else None."""
        op = self.by_name.get(name)
        while op is not None and op.opcode == "copy" and len(op.operands) == 1:
            op = self.by_name.get(op.operands[0])
        if op is None or op.opcode != "constant" or not re.fullmatch(r"-?\d+", op.args):
            return None
        return int(op.args)

    def loop_start(self, loop: Instruction, counter: str) -> int | None:
        """The initial value of the loop's ``counter`` (an element of the condition's parameter),
        read from the tuple the ``while`` starts with."""
        element = self.by_name.get(counter)
        index = re.search(r"index=(\d+)", element.attrs) if element is not None else None
        if element is None or element.opcode != "get-tuple-element" or index is None:
            return None
        init = self.by_name.get(loop.operands[0]) if loop.operands else None
        if init is None or init.opcode != "tuple" or int(index[1]) >= len(init.operands):
            return None
        return self.constant(init.operands[int(index[1])])


def _source_frames(text: str) -> dict[int, tuple[str, str]]:
    """Stack frame id -> (file, function) of its innermost location, from the module's
    ``FileNames``/``FunctionNames``/``FileLocations``/``StackFrames`` tables."""
    tables: dict[str, dict[int, str]] = {}
    section = ""
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        entry = re.match(r"(\d+) (.*)$", line)
        if section and entry:
            tables.setdefault(section, {})[int(entry.group(1))] = entry.group(2)
        elif line and not line[0].isdigit():
            section = ""
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locations = {}
    for key, value in tables.get("FileLocations", {}).items():
        ids = re.match(r"\{file_name_id=(\d+) function_name_id=(\d+)", value)
        if ids:
            locations[key] = (files.get(int(ids.group(1)), "").strip('"'),
                              functions.get(int(ids.group(2)), "").strip('"'))
    frames = {}
    for key, value in tables.get("StackFrames", {}).items():
        location = re.match(r"\{file_location_id=(\d+)", value)
        if location and int(location.group(1)) in locations:
            frames[key] = locations[int(location.group(1))]
    return frames


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a program: its kind (one of KINDS), group size p, the operand bytes B one
    device holds, how many times it runs per run of the program, and whether its groups hold
    devices of several slices (over the data-center network)."""

    kind: str
    group: int
    operand_bytes: float
    runs: float
    cross_slice: bool | None = False  # a group spans slices (None: groups not read)

    @property
    def sent_bytes(self) -> float:
        """Bytes one device sends per run (the ring model of the module docstring)."""
        p, b = self.group, self.operand_bytes
        if self.kind == "collective-permute":
            return b
        if p <= 1:
            return 0.0
        return {"all-gather": (p - 1) * b, "reduce-scatter": (p - 1) / p * b,
                "all-reduce": 2 * (p - 1) / p * b, "all-to-all": (p - 1) / p * b}[self.kind]


@dataclasses.dataclass(frozen=True)
class Collectives:
    """The collectives of a program and the loops whose trip count was not known (counted once)."""

    ops: tuple[Collective, ...]
    unknown_loops: tuple[str, ...]

    def bytes_by_kind(self) -> dict[str, float]:
        """Bytes one device sends per run of the program, by kind (every kind, 0 when absent)."""
        return {k: sum(c.sent_bytes * c.runs for c in self.ops if c.kind == k) for k in KINDS}

    def count_by_kind(self) -> dict[str, float]:
        return {k: sum(c.runs for c in self.ops if c.kind == k) for k in KINDS}

    def cross_slice(self) -> Collectives:
        """The collectives whose groups span slices (and those whose groups were not read)."""
        return Collectives(tuple(c for c in self.ops if c.cross_slice is not False),
                           self.unknown_loops)


def group_size(attrs: str, num_partitions: int) -> int:
    """Devices per replica group of a collective's ``replica_groups`` (mesh-axis, iota or explicit
    form; empty = every device)."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([\d,\s]*)\}", attrs)
    if explicit:
        return len([d for d in explicit.group(1).split(",") if d.strip()])
    return num_partitions


def replica_groups(attrs: str, num_partitions: int) -> list[list[int]] | None:
    """The device (partition) ids of each group of a collective: its ``replica_groups`` in the
    explicit, iota (``[G,S]<=[dims]T(perm)``) or mesh-axis form, or a permute's
    ``source_target_pairs`` (each pair a group); every device when empty or absent; None for a
    form not read."""
    pairs = re.search(r"source_target_pairs=\{((?:\{[\d,\s]*\},?)*)\}", attrs)
    if pairs:
        return [[int(d) for d in g.split(",") if d.strip()]
                for g in re.findall(r"\{([\d,\s]*)\}", pairs.group(1))]
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if iota:
        dims = [int(d) for d in iota.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(4):
            ids = ids.transpose([int(p) for p in iota.group(4).split(",")])
        return ids.reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if mesh:
        sizes = [(a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", mesh.group(1))]
        if math.prod(n for _, n in sizes) != num_partitions:
            return None
        grouped = [[a for a, _ in sizes].index(a) for a in re.findall(r"'(\w+)'", mesh.group(2))]
        ids = np.arange(num_partitions).reshape([n for _, n in sizes])
        rest = [i for i in range(len(sizes)) if i not in grouped]
        size = math.prod(sizes[i][1] for i in grouped)
        return ids.transpose(rest + grouped).reshape(-1, size).tolist()
    explicit = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?)*)\}", attrs)
    if explicit and explicit.group(1):
        return [[int(d) for d in g.split(",") if d.strip()]
                for g in re.findall(r"\{([\d,\s]*)\}", explicit.group(1))]
    if explicit or "replica_groups" not in attrs:
        return [list(range(num_partitions))]
    return None


def spans_slices(groups: list[list[int]] | None, slice_of: list[int]) -> bool | None:
    """Whether some group holds devices of more than one slice (``slice_of``: the slice of each
    device id); None when the groups were not read."""
    if groups is None:
        return None
    return any(len({slice_of[d] for d in group}) > 1 for group in groups)


def _operand_bytes(program: Program, op: Instruction, kind: str, group: int) -> float:
    """B of the module docstring: the bytes of the operands (the first only for a permute, whose
    other operands are buffers and offsets); from the result when an operand is not in the text."""
    names = op.operands[:1] if kind == "collective-permute" else op.operands
    shapes = [program.by_name[n].shape for n in names if n in program.by_name]
    if names and len(shapes) == len(names):
        return sum(shape_bytes(s) for s in shapes)
    result = shape_bytes(op.shape)
    return {"all-gather": result / group, "reduce-scatter": result * group}.get(kind, result)


def collectives(program: Program, slice_of: list[int] | None = None) -> Collectives:
    """Every collective of ``program`` with its runs per program run: an instruction each, except
    the copies of one asynchronous collective (same kind, ``channel_id`` and ``chain_id``), which
    count once with the most runs among them. (``channel_id`` alone does not tell collectives apart:
    libtpu gives unrelated ones the same id.) ``slice_of``: the slice of each device id (partition,
    the mesh's devices in order), to mark the collectives whose groups span slices."""
    found: dict[tuple[str, str], Collective] = {}
    for op in program.instructions:
        megascale = re.search(r'_xla_megascale_transfer_type="(\w+)"', op.attrs)
        if op.opcode == "send" and megascale:  # libtpu multislice: one program per slice, the
            kind = megascale.group(1).lower().replace("_", "-")  # DCN collectives as host sends
            if kind in KINDS:
                group = len(set(slice_of)) if slice_of else 2
                found[("dcn", op.name)] = Collective(kind, group, _operand_bytes(program, op, kind, group),
                                                     program.runs.get(op.computation, 0.0), True)
            continue
        kind = _OPCODE_KIND.get(op.opcode)
        if kind is None:
            continue
        if kind == "all-reduce" and op.computation.startswith("all-reduce-scatter"):
            kind = "reduce-scatter"  # libtpu's reduce-scatter: all-reduce + slice in a fusion
        group = group_size(op.attrs, program.num_partitions)
        channel = re.search(r"channel_id=(\d+)", op.attrs)
        chain = re.search(r'chain_id="(\d+)"', op.attrs)
        key = (kind, channel.group(1) if channel else "", chain.group(1)) if chain else (kind, op.name)
        cross = (spans_slices(replica_groups(op.attrs, program.num_partitions), slice_of)
                 if slice_of else False)
        c = Collective(kind, group, _operand_bytes(program, op, kind, group),
                       program.runs.get(op.computation, 0.0), cross)
        if key not in found or c.runs > found[key].runs:
            found[key] = c
    return Collectives(tuple(found.values()), program.unknown_loops)


_KERNEL_TARGETS = ("tpu_custom_call", "mosaic_gpu", "__gpu$xla.gpu.triton")


@dataclasses.dataclass
class Kernel:
    """A custom kernel of a program: its calls per program run, whether its custom call carries a
    cost estimate (``pallas_call(cost_estimate=...)``; XLA's cost analysis counts no FLOPs for one
    without), and the kernel's own metadata (e.g. splash attention's block sizes)."""

    calls: float
    cost_estimate: bool
    metadata: dict


def _kernel_metadata(attrs: str) -> dict:
    """The JSON object a Pallas TPU call records as ``kernel_metadata.xprof_metadata``, or {}."""
    found = re.search(r'"xprof_metadata":"((?:[^"\\]|\\.)*)"', attrs)
    if not found:
        return {}
    try:
        metadata = json.loads(json.loads(f'"{found.group(1)}"'))
    except json.JSONDecodeError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def kernels(program: Program) -> dict[str, Kernel]:
    """Custom kernels (Pallas on TPU: Mosaic ``tpu_custom_call``; Mosaic GPU, Triton) by name. The
    name is the ``pallas_call``'s (the op_name component before ``pallas_call``: ``splash_mha_fwd``,
    or ``gmm`` from ``jit(gmm)``), else the instruction's name without its ``.N`` suffix."""
    out: dict[str, Kernel] = {}
    for op in program.instructions:
        target = re.search(r'custom_call_target="([^"]*)"', op.attrs)
        if op.opcode != "custom-call" or not target or target.group(1) not in _KERNEL_TARGETS:
            continue
        op_name = re.search(r'op_name="([^"]*)"', op.attrs)
        parts = op_name.group(1).split("/") if op_name else []
        name = (re.sub(r"^jit\((.*)\)$", r"\1", parts[-2])
                if len(parts) > 1 and parts[-1] == "pallas_call"
                else re.sub(r"(\.\d+|\.clone)+$", "", op.name))
        kernel = out.setdefault(name, Kernel(0.0, '"cost_estimate"' in op.attrs,
                                             _kernel_metadata(op.attrs)))
        kernel.calls += program.runs.get(op.computation, 0.0)
    return dict(sorted(out.items()))


def dots_from(program: Program, file_suffix: str) -> dict[str, float]:
    """The program's matmuls (``dot`` and ``convolution``) whose innermost source line is in a file
    ending with ``file_suffix``, by function name, with their runs per program run."""
    out: dict[str, float] = {}
    for op in program.instructions:
        frame = re.search(r"stack_frame_id=(\d+)", op.attrs)
        if op.opcode not in ("dot", "convolution") or frame is None:
            continue
        file, function = program.frames.get(int(frame.group(1)), ("", ""))
        if file.endswith(file_suffix):
            out[function] = out.get(function, 0.0) + program.runs.get(op.computation, 0.0)
    return dict(sorted(out.items()))


_SIZE_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def largest_buffers(dump_dir: Path, count: int = 3) -> list[dict[str, float | str]]:
    """The ``count`` largest HBM allocations of the memory-usage report XLA dumps (``xla_dump_to``)
    for the program: their size and the largest array among the values that share each, largest
    first; [] when there is no report."""
    reports = sorted(Path(dump_dir).glob("*memory-usage-report.txt"))
    if not reports:
        return []
    entries = []
    text = reports[-1].read_text().split("Memory Space:")
    default = next((s for s in text if s.lstrip().startswith("default")), "")
    for line in default.splitlines():
        fields = [f.strip() for f in line.split(";")]
        size = re.fullmatch(r"([\d.]+)(B|KiB|MiB|GiB|TiB)", fields[1]) if len(fields) == 5 else None
        if size is None:
            continue
        arrays = _SHAPE.finditer(fields[4])
        largest = max(arrays, key=lambda m: shape_bytes(m.group(0)), default=None)
        entries.append({"bytes": float(size.group(1)) * _SIZE_UNITS[size.group(2)],
                        "largest_array": largest.group(0) if largest else fields[4],
                        "array_bytes": shape_bytes(largest.group(0)) if largest else 0.0,
                        "values": fields[4]})
    return sorted(entries, key=lambda e: -e["bytes"])[:count]
