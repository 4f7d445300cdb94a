"""adapter_config.json of a PEFT LoRA adapter: parse it, refuse what we cannot serve, and
resolve which base modules carry LoRA with which rank and scale.

The semantics follow HF PEFT (`check_target_module_exists`, `get_pattern_key`,
`_maybe_include_all_linear_layers`, `LoraModel._create_and_replace`), re-implemented here.
The config is untrusted (HTTP uploads): every failure is an `AdapterFormatError`, and the
regular expressions it carries run with bounded cost (see peft_regex).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .layout import BaseLayout
from .peft_regex import BoundedRegex, PatternError

MAX_CONFIG_BYTES = 1 << 20
REGEX_BUDGET_S = 2.0  # for all pattern matching of one config against one base model
_MAX_ENTRIES = 4096  # entries in target/exclude lists and rank/alpha patterns
_CONDENSE_FROM = 20  # PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION
DEFAULT_LORA_R = 8  # LoraConfig defaults, used when a key is absent
DEFAULT_LORA_ALPHA = 8

# Truthy values of these fields make the adapter compute something other than plain LoRA.
_UNSUPPORTED = {
    "lora_bias": "a LoRA bias (lora_bias)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# These initialisations rewrite the base weights (or change the forward): an adapter saved
# with them is only correct on its own modified base, not on the shared one.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


class AdapterFormatError(ValueError):
    """An adapter folder/file that cannot be served; the message names the problem (shown to API users)."""


@dataclass(frozen=True)
class ModulePlan:
    """What the config says about one targeted module."""

    rank: int
    alpha: float
    scale: float  # alpha / rank, or alpha / sqrt(rank) with use_rslora
    dora: bool = False  # use_dora: the adapter's file carries a magnitude vector for the module


def parse_config(config_bytes: bytes) -> dict[str, Any]:
    """Parse adapter_config.json and refuse adapters that are not plain LoRA."""
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_bytes)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting or numbers
        raise AdapterFormatError(f"adapter_config.json is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError("adapter_config.json must be a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(
            f"peft_type is {_short(config.get('peft_type'))}; only LORA adapters are supported"
        )
    _check_supported(config)
    return config


def _check_supported(config: dict[str, Any]) -> None:
    for key, feature in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterFormatError(f"adapter uses {feature}, which is not supported (served: LoRA, DoRA, "
                                     "modules_to_save and trainable tokens on the output layer and input embedding)")
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterFormatError(f"bias={_short(bias)} is not supported (it trains base biases); use bias='none'")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterFormatError(
            f"init_lora_weights={init[:40]!r} changes the base weights; convert the adapter to plain LoRA "
            "(PEFT save_pretrained with path_initial_model_for_weight_conversion)"
        )
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):  # fan_in_fan_out: A/B are [r,in]/[out,r] either way
        if not isinstance(config.get(key, False), bool):
            raise AdapterFormatError(f"{key} must be true or false")


def plan_modules(config: dict[str, Any], layout: BaseLayout) -> dict[str, ModulePlan]:
    """Base module name -> rank and scale, for every module the config targets."""
    try:
        return _plan_modules(config, layout, BoundedRegex(REGEX_BUDGET_S))
    except PatternError as exc:
        raise AdapterFormatError(str(exc)) from None


def _plan_modules(config: dict[str, Any], layout: BaseLayout, rx: BoundedRegex) -> dict[str, ModulePlan]:
    spec = _TargetSpec.from_config(config, layout)
    names = sorted(layout.linear.keys() | layout.other)
    targets = [name for name in names if spec.selects(name, rx)]
    if not targets:
        wanted = str(config.get("target_modules"))[:200]
        raise AdapterFormatError(f"target_modules {wanted} match no module of the base model "
                                 "(adapter made for another model?)")
    for name in targets:
        reject_unless_adaptable(name, layout, f"target module {name!r}")
        if config.get("use_dora") and name == layout.input_embedding:
            raise AdapterFormatError(f"target module {name!r}: DoRA on the input embedding is not supported "
                                     "(DoRA is served on linear layers and the output layer)")
    _check_tying(config, layout, targets)
    r = _positive_int(config.get("r", DEFAULT_LORA_R), "r")
    alpha = _finite(config.get("lora_alpha", DEFAULT_LORA_ALPHA), "lora_alpha")
    rank_pattern = _pattern_dict(config, "rank_pattern", _positive_int)
    alpha_pattern = _pattern_dict(config, "alpha_pattern", _finite)
    rslora, dora = config.get("use_rslora", False), config.get("use_dora", False)
    plans = {}
    for name in targets:
        rank = _pattern_value(rank_pattern, name, r, rx)
        module_alpha = _pattern_value(alpha_pattern, name, alpha, rx)
        scale = module_alpha / math.sqrt(rank) if rslora else module_alpha / rank
        plans[name] = ModulePlan(rank, float(module_alpha), float(scale), dora)
    return plans


def reject_unless_adaptable(name: str, layout: BaseLayout, what: str) -> None:
    """Raise unless `name` is a module that can carry LoRA here (a linear layer, the output layer or
    the input embedding), saying why not."""
    if name in layout.linear or name in layout.special_dims:
        return
    if name == layout.output_name:
        raise AdapterFormatError(f"{what}: LoRA on this model's output layer is not supported (not a Linear)")
    if name in layout.embeddings:
        raise AdapterFormatError(f"{what}: LoRA is supported on the input embedding only, not on other "
                                 "embedding layers")
    if name in layout.other:
        raise AdapterFormatError(f"{what} is not a linear layer; only linear layers can carry LoRA")
    raise AdapterFormatError(f"{what}: the base model has no such module (adapter made for another model?)")


def _check_tying(config: dict[str, Any], layout: BaseLayout, targets: list[str]) -> None:
    """PEFT's `ensure_weight_tying` gives a tied output layer the embedding's adapter; not served."""
    if not isinstance(config.get("ensure_weight_tying", False), bool):
        raise AdapterFormatError("ensure_weight_tying must be true or false")
    if config.get("ensure_weight_tying") and layout.tied:
        raise AdapterFormatError("ensure_weight_tying=true (the output layer sharing the embedding's adapter) is "
                                 "not supported; save the adapter with ensure_weight_tying=false")


@dataclass(frozen=True)
class _TargetSpec:
    """target_modules / exclude_modules / layers_to_transform / layers_pattern, validated."""

    targets: str | frozenset[str]  # a regex (fullmatch), or names matched exactly or as `.suffix`
    exclude: str | frozenset[str] | None
    layers: frozenset[int] | None
    layers_pattern: tuple[str, ...]

    @classmethod
    def from_config(cls, config: dict[str, Any], layout: BaseLayout) -> _TargetSpec:
        targets = _names_or_regex(config.get("target_modules"), "target_modules")
        if targets is None:
            raise AdapterFormatError("adapter_config.json has no target_modules")
        layers, layers_pattern = _layers(config)
        if isinstance(targets, str) and (layers is not None or layers_pattern):
            raise AdapterFormatError("layers_to_transform / layers_pattern cannot be used with a string target_modules")
        if isinstance(targets, str) and targets.lower() == "all-linear":
            targets = frozenset(layout.linear)  # the output layer is already left out of `linear`
        if not isinstance(targets, str) and len(targets) >= _CONDENSE_FROM:
            targets = _condense(targets, layout.linear.keys() | layout.other)
        exclude = _names_or_regex(config.get("exclude_modules"), "exclude_modules")
        return cls(targets, exclude or None, layers, layers_pattern)

    def selects(self, name: str, rx: BoundedRegex) -> bool:
        if self.exclude is not None and _listed(self.exclude, name, rx):
            return False
        if isinstance(self.targets, str):
            return rx.match(self.targets, name, "target_modules", full=True) is not None
        if name in self.targets:  # an exact name is taken as is: layers_to_transform does not apply
            return True
        if not any(name.endswith("." + t) for t in self.targets):
            return False
        if self.layers is None:
            return True
        index = self._layer_index(name, rx)
        return index is not None and index in self.layers

    def _layer_index(self, name: str, rx: BoundedRegex) -> int | None:
        # Lazy `.*?`: the first numbered segment is the layer (not e.g. a later expert index).
        patterns = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in self.layers_pattern]
        for pattern in patterns or [r".*?\.[^.]*\.(?P<idx>\d+)\."]:
            found = rx.match(pattern, name, "layers_pattern")
            if found is not None:
                return int(found.group("idx"))
        return None


def _listed(names: str | frozenset[str], name: str, rx: BoundedRegex) -> bool:
    if isinstance(names, str):
        return rx.match(names, name, "exclude_modules", full=True) is not None
    return name in names or any(name.endswith("." + n) for n in names)


def _condense(targets: frozenset[str], names: set[str]) -> frozenset[str]:
    """PEFT replaces 20+ target names by the shortest suffixes that still tell them apart from
    the other modules. The matched set stays the same, but exact names become suffixes, and
    suffixes are subject to layers_to_transform: mirror it so that case behaves as in PEFT."""
    dotted = tuple("." + t for t in targets)
    others = [n for n in names if n not in targets and not n.endswith(dotted)]
    taken = {s for n in others for s in _suffixes(n)}
    chosen: set[str] = set()
    for item, suffixes in sorted(((t, _suffixes(t)) for t in targets), key=lambda pair: pair[1]):
        for suffix in suffixes:
            if suffix in chosen or suffix in taken:
                continue
            if not any(item.endswith("." + c) for c in chosen):
                chosen.add(suffix)
                break
    return frozenset(chosen) if chosen and len(chosen) < len(targets) else targets


def _suffixes(name: str) -> list[str]:
    """'a.b.c' -> ['c', 'b.c', 'a.b.c']."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def _pattern_value(patterns: dict[str, Any], name: str, default: Any, rx: BoundedRegex) -> Any:
    """PEFT's get_pattern_key: the first key that matches the end of the name (at a dot)."""
    for key, value in patterns.items():
        if rx.match(rf"(.*\.)?({key})$", name, "rank_pattern/alpha_pattern") is not None:
            return value
    return default


def _names_or_regex(value: Any, field: str) -> str | frozenset[str] | None:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterFormatError(f"{field} must be a string or a list of non-empty strings")
    if len(value) > _MAX_ENTRIES:
        raise AdapterFormatError(f"{field} has more than {_MAX_ENTRIES} entries")
    return frozenset(value)


def _layers(config: dict[str, Any]) -> tuple[frozenset[int] | None, tuple[str, ...]]:
    layers = config.get("layers_to_transform")
    if _is_int(layers):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(_is_int(i) for i in layers)):
        raise AdapterFormatError("layers_to_transform must be an integer or a list of integers")
    pattern = config.get("layers_pattern") or ()
    pattern = (pattern,) if isinstance(pattern, str) else pattern
    if not isinstance(pattern, list | tuple) or not all(isinstance(p, str) for p in pattern):
        raise AdapterFormatError("layers_pattern must be a string or a list of strings")
    if pattern and layers is None:
        raise AdapterFormatError("layers_pattern requires layers_to_transform")
    # An empty list means "all layers" in PEFT.
    return (frozenset(layers) if layers else None), tuple(pattern)


def _pattern_dict(config: dict[str, Any], field: str, check: Any) -> dict[str, Any]:
    value = config.get(field) or {}
    if not isinstance(value, dict) or len(value) > _MAX_ENTRIES:
        raise AdapterFormatError(f"{field} must be an object of at most {_MAX_ENTRIES} entries")
    return {key: check(v, f"{field}[{key[:80]!r}]") for key, v in value.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any, field: str) -> int:
    if not _is_int(value) or value < 1:
        raise AdapterFormatError(f"{field} must be a positive integer, got {_short(value)}")
    return value


def _finite(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterFormatError(f"{field} must be a finite number, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    return repr(value)[:60]

