"""The Plan: the contract between the plan search and the cube runtime.

A Plan is data, nothing else: the search returns a Plan and never receives a module; the runtime
consumes a Plan and never searches. It says how one *scale unit* of ``plan_ngpus`` GPUs splits the
model (tensor parallel ``tp`` x pipeline parallel ``pp``), how the pipeline is scheduled, and how the
``scaling_factor`` scale units (data parallel to each other) share the training state: ``zero`` is the
ZeRO level (0: every unit keeps everything, 1 and 2: gradients and optimizer states sharded, weights
kept whole from forward to backward, 3: weights resharded after the forward too), sharded inside
``zero_n_groups`` groups of consecutive units and replicated across them. It also names the modules
whose forward is recomputed in backward, and whether the optimizer steps each weight inside the backward
(``optimizer_in_backward``: no gradient kept beyond the layer whose backward runs; ``optim/in_backward.py``),
and those whose activations wait in host memory until the backward (``offload_modules``). Both are written
only when set, so plans without them keep their JSON and fingerprint.

A Plan is saved as JSON (``plan.json``) and validated on load, so a hand-edited or stale file stops the
run with one message that says what to change. ``fingerprint()`` identifies a plan's content; the
compile pass uses it (and ``model_fingerprint``) to decide whether a saved plan can be reused.
"""

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Tuple

from fairseq_ext.errors import UserInputError

PLAN_VERSION = 1
ZERO_LEVELS = (0, 1, 2, 3)
PIPELINE_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")
INTERLEAVED = "Interleaved1F1B"
MAX_ZERO = ZERO_LEVELS[-1]

_COUNTS = ("plan_ngpus", "scaling_factor", "tp", "pp", "num_microbatches", "virtual_stages_per_rank")


@dataclass(frozen=True)
class Plan:
    """One parallel plan. See the module docstring; field names are the JSON keys."""

    plan_ngpus: int  # GPUs in one scale unit (PLAN_NGPUS)
    scaling_factor: int  # data-parallel scale units (CUBE_SCALING_FACTOR)
    tp: int
    pp: int
    pp_schedule: str = "1F1B"
    num_microbatches: int = 1
    virtual_stages_per_rank: int = 1
    # First decoder layer index of stages 1..S-1 (S = pp * virtual_stages_per_rank); empty: balanced by layer count.
    stage_boundaries: Tuple[int, ...] = ()
    zero: int = 0  # ZeRO level 0..3 (USE_ZERO); true/false of older files read as 1/0
    zero_n_groups: int = 1  # hybrid sharding: shard inside this many groups of units, replicate across
    recompute_modules: Tuple[str, ...] = ()  # module class names
    optimizer_in_backward: bool = False  # OPTIMIZER_IN_BACKWARD; absent from the JSON when off
    offload_modules: Tuple[str, ...] = ()  # module class names whose saved activations wait in host memory
    model_fingerprint: str = ""  # filled by the compile pass
    version: int = PLAN_VERSION

    def __post_init__(self):
        # JSON has no tuples: accept lists so that from_json and hand-built plans compare equal.
        for name in ("stage_boundaries", "recompute_modules", "offload_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.zero, bool):  # plan files written when zero was ZeRO-1 on or off
            object.__setattr__(self, "zero", int(self.zero))

    @property
    def world_size(self) -> int:
        """GPUs the plan runs on: PLAN_NGPUS x CUBE_SCALING_FACTOR."""
        return self.plan_ngpus * self.scaling_factor

    @property
    def dp_shard(self) -> int:
        """Scale units that share (shard) one copy of the training state: 1 at ZeRO level 0, else
        CUBE_SCALING_FACTOR / ZERO_N_GROUPS."""
        return self.scaling_factor // self.zero_n_groups if self.zero else 1

    @property
    def dp_replicate(self) -> int:
        """Copies of the training state across the scale units (dp_replicate x dp_shard = scaling_factor)."""
        return self.scaling_factor // self.dp_shard

    @property
    def on_fsdp(self) -> bool:
        """Whether the scale units train through FSDP2 (``fully_shard`` at level ``zero``): with several units, or
        on one GPU alone at a ZeRO level >= 1, which shards over a mesh of one rank (nothing is split: all-gathers
        and reduce-scatters become copies, and levels 1-2 keep the gathered weights beside the shards). A
        single unit of several GPUs has no data parallel to run."""
        return self.scaling_factor > 1 or (self.zero > 0 and self.world_size == 1)

    @property
    def num_stages(self) -> int:
        """Pipeline stages S = pp x virtual_stages_per_rank."""
        return self.pp * self.virtual_stages_per_rank

    def validate(self) -> "Plan":
        """Check the plan on its own (no model, no world size).

        Returns:
            self, so that ``Plan(...).validate()`` can be chained.
        Raises:
            UserInputError: the first rule broken, with the numbers and what to change.
        """
        if self.version != PLAN_VERSION:
            raise UserInputError(
                f"plan version {self.version!r} is not supported (this fairseq_ext reads "
                f"version {PLAN_VERSION}); recompile the plan with run.sh compile"
            )
        for name in _COUNTS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")
        if self.tp * self.pp != self.plan_ngpus:
            raise UserInputError(
                f"tp {self.tp} x pp {self.pp} = {self.tp * self.pp} does not equal PLAN_NGPUS "
                f"{self.plan_ngpus}; choose tp and pp whose product is PLAN_NGPUS"
            )
        if self.pp_schedule not in PIPELINE_SCHEDULES:
            raise UserInputError(
                f"unknown pp_schedule {self.pp_schedule!r}; choose one of {', '.join(PIPELINE_SCHEDULES)}"
            )
        if self.pp_schedule == INTERLEAVED and self.virtual_stages_per_rank < 2:
            raise UserInputError(
                f"{INTERLEAVED} needs virtual_stages_per_rank >= 2, got "
                f"{self.virtual_stages_per_rank}; raise it or choose 1F1B"
            )
        if self.pp_schedule != INTERLEAVED and self.virtual_stages_per_rank > 1:
            raise UserInputError(
                f"virtual_stages_per_rank {self.virtual_stages_per_rank} needs pp_schedule "
                f"{INTERLEAVED}, got {self.pp_schedule}; set it to 1 or change the schedule"
            )
        if self.pp > 1 and self.num_microbatches < self.pp:
            raise UserInputError(
                f"{self.pp_schedule} with pp {self.pp} needs at least {self.pp} micro-batches, "
                f"got {self.num_microbatches}; raise num_microbatches"
            )
        self._validate_stage_boundaries()
        self._validate_zero()
        if not isinstance(self.recompute_modules, tuple) or not all(
            isinstance(name, str) and name for name in self.recompute_modules
        ):
            raise UserInputError(
                f"recompute_modules must be a list of module class names, got {self.recompute_modules!r}"
            )
        if not isinstance(self.optimizer_in_backward, bool):
            raise UserInputError(f"optimizer_in_backward must be true or false, got {self.optimizer_in_backward!r}")
        self._validate_offload()
        if not isinstance(self.model_fingerprint, str):
            raise UserInputError(f"model_fingerprint must be a string, got {self.model_fingerprint!r}")
        return self

    def _validate_stage_boundaries(self) -> None:
        boundaries = self.stage_boundaries
        if not isinstance(boundaries, tuple) or not all(_is_int(b) for b in boundaries):
            raise UserInputError(f"stage_boundaries must be a list of layer indices, got {boundaries!r}")
        if not boundaries:
            return
        stages = self.num_stages
        if len(boundaries) != stages - 1:
            raise UserInputError(
                f"stage_boundaries has {len(boundaries)} entries but pp {self.pp} x virtual_stages_per_rank "
                f"{self.virtual_stages_per_rank} = {stages} stages need {stages - 1} (the first layer of "
                f"stages 1..{stages - 1}); fix the list or leave it empty to balance by layer count"
            )
        if boundaries[0] <= 0:
            raise UserInputError(f"stage_boundaries {list(boundaries)} must start above 0 (stage 0 begins at layer 0)")
        if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
            raise UserInputError(
                f"stage_boundaries {list(boundaries)} must be strictly increasing "
                f"(every stage needs at least one layer)"
            )

    def _validate_offload(self) -> None:
        if not isinstance(self.offload_modules, tuple) or not all(
            isinstance(name, str) and name for name in self.offload_modules
        ):
            raise UserInputError(f"offload_modules must be a list of module class names, got {self.offload_modules!r}")
        both = sorted(set(self.offload_modules) & set(self.recompute_modules))
        if both:
            raise UserInputError(
                f"{', '.join(both)} is both recomputed and offloaded: a recomputed module keeps only its inputs, "
                f"so there is nothing to offload; recompute it (RECOMPUTE_MODULE_NAMES) or offload its "
                f"activations (OFFLOAD_ACTIVATIONS=1), not both"
            )

    def _validate_zero(self) -> None:
        if not _is_int(self.zero) or self.zero not in ZERO_LEVELS:
            raise UserInputError(f"zero must be a ZeRO level 0, 1, 2 or 3 (USE_ZERO), got {self.zero!r}")
        if not self.zero:
            return  # zero_n_groups only matters with ZeRO
        groups = self.zero_n_groups
        if not _is_int(groups) or groups < 1:
            raise UserInputError(f"zero_n_groups must be a positive integer, got {groups!r}")
        if self.scaling_factor % groups:
            raise UserInputError(
                f"zero_n_groups {groups} does not divide CUBE_SCALING_FACTOR {self.scaling_factor}: ZeRO shards "
                f"the training state among the {self.scaling_factor} data-parallel replicas of each parameter "
                f"shard, in {groups} equal groups; choose a zero_n_groups that divides {self.scaling_factor}"
            )

    def check_world_size(self, world_size: int) -> None:
        """Raise UserInputError unless the plan runs on exactly ``world_size`` processes."""
        if self.world_size != world_size:
            raise UserInputError(
                f"PLAN_NGPUS {self.plan_ngpus} x CUBE_SCALING_FACTOR {self.scaling_factor} = {self.world_size} "
                f"does not equal the world size {world_size} (NPROC_PER_NODE x NNODES)"
            )

    def to_dict(self) -> dict:
        """The plan as plain JSON values (tuples become lists); ``optimizer_in_backward`` only when on and
        ``offload_modules`` only when not empty, so that plans written before they existed keep their text and
        fingerprint."""
        data = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
            if key != "offload_modules" or value
        }
        if not self.optimizer_in_backward:
            del data["optimizer_in_backward"]
        return data

    def to_json(self) -> str:
        """The plan as JSON text, keys sorted (the same plan always gives the same text)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Parse and validate a plan; raise UserInputError for malformed JSON, unknown or missing keys."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"plan is not valid JSON: {exc}; fix the file or recompile the plan") from None
        if not isinstance(data, dict):
            raise UserInputError(f"plan must be a JSON object, got {type(data).__name__}")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise UserInputError(f"unknown plan keys: {', '.join(unknown)}; known keys: {', '.join(fields)}")
        missing = [name for name, field in fields.items() if field.default is dataclasses.MISSING and name not in data]
        if missing:
            raise UserInputError(f"plan is missing required keys: {', '.join(missing)}")
        return cls(**data).validate()

    def save(self, path: str) -> None:
        """Validate, then write the plan to ``path`` atomically: a reader sees the old file or the new one,
        never a half-written one (temp file in the same folder, then ``os.replace``)."""
        self.validate()
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> "Plan":
        """Read and validate a plan file; errors name the file."""
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise UserInputError(f"no plan file at {path}; write one with run.sh compile") from None
        try:
            return cls.from_json(text)
        except UserInputError as exc:
            raise UserInputError(f"{path}: {exc}") from None

    def fingerprint(self) -> str:
        """A short stable id of the plan's whole content: the first 16 hex digits of the sha256 of its
        canonical JSON (sorted keys, no whitespace), the same across runs and Python versions."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def default_plan(
    plan_ngpus: int,
    scaling_factor: int,
    gpus_per_node: int,
    zero: int = 0,
    zero_n_groups: int = 1,
    recompute_modules: Tuple[str, ...] = (),
) -> Plan:
    """The rule used until the search exists: tensor parallel inside a node, pipeline across nodes.

    tp = gcd(plan_ngpus, gpus_per_node), pp = plan_ngpus // tp, schedule 1F1B with pp micro-batches
    (the fewest that keep every stage busy; 1 when pp == 1).

    Returns:
        a validated Plan.
    """
    for name, value in (
        ("plan_ngpus", plan_ngpus),
        ("scaling_factor", scaling_factor),
        ("gpus_per_node", gpus_per_node),
    ):
        if not _is_int(value) or value < 1:
            raise UserInputError(f"{name} must be a positive integer, got {value!r}")
    tp = math.gcd(plan_ngpus, gpus_per_node)
    pp = plan_ngpus // tp
    return Plan(
        plan_ngpus=plan_ngpus,
        scaling_factor=scaling_factor,
        tp=tp,
        pp=pp,
        pp_schedule="1F1B",
        num_microbatches=pp,
        zero=zero,
        zero_n_groups=zero_n_groups,
        recompute_modules=tuple(recompute_modules),
    ).validate()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
