"""The run config: RunConfig, the sections of every part of a `dwm train` run (the trainer's, selector, influence,
weighting, and the domain mixtures doge and odm), checked as a whole; the built-in weighters and selectors
registered by name (lazily, so neither the trainer nor a uniform run imports them); `load_config` (defaults, TOML, overrides), `help_config`, the shipped
recipes (`recipe_path`) and `validate` (every value, the files the run reads, the Plan for a world size).
dwm.run wires a run from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dwm import config as C
from dwm.errors import UserError
from dwm.selection.config import InfluenceConfig
from dwm.train.config import Plan, TrainerConfig, plan_for_data
from dwm.train.selector import SELECTORS, SelectorConfig
from dwm.train.weighter import WEIGHTERS
from dwm.weighting.config import WeightingConfig
from dwm.weighting.mixing_config import DoGEConfig, ODMConfig

WEIGHTERS.register("dwm", "dwm.weighting.dwm_weighter:DWMWeighter")
WEIGHTERS.register("domains", "dwm.weighting.domains:DomainWeighter")
WEIGHTERS.register("doge", "dwm.weighting.mixing:DoGEWeighter")
WEIGHTERS.register("odm", "dwm.weighting.mixing:ODMWeighter")
SELECTORS.register("influence", "dwm.selection.influence:InfluenceSelector")
SELECTORS.register("dwm", "dwm.weighting.resample:ResampleSelector")
SELECTORS.register("domain-mix", "dwm.weighting.mixing:DomainMixSelector")
RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass
class RunConfig(TrainerConfig):
    """A whole `dwm train` run."""

    selector: SelectorConfig = field(default_factory=SelectorConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    doge: DoGEConfig = field(default_factory=DoGEConfig)
    odm: ODMConfig = field(default_factory=ODMConfig)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        mode = self.weighting.mode
        if mode not in WEIGHTERS and not (Path(mode).is_dir() and (Path(mode) / "weighting").is_dir()):
            hint = C.did_you_mean(mode, WEIGHTERS.names())
            raise UserError(f"config key {prefix}weighting.mode: {mode!r} is not a weighter "
                            f"({', '.join(WEIGHTERS.names())}) nor a run directory with a weighting/ folder{hint}")
        SELECTORS.get(self.selector.mode)  # did-you-mean error on an unknown name
        if mode == "dwm" and self.weighting.net.init_from_lm_embedding and not _lm_has_trained_weights(self):
            raise UserError(f"config key {prefix}weighting.net.init_from_lm_embedding: the LM {self.model.spec!r} "
                            "starts from random weights, so its embedding carries nothing at step 0; set it false "
                            "(or start from a trained checkpoint)")


def _lm_has_trained_weights(cfg: RunConfig) -> bool:
    """Whether the LM starts from trained weights (a checkpoint directory), not from a fresh initialisation."""
    from dwm.train.model import PRESETS

    if cfg.model.spec in PRESETS or getattr(cfg.model, "init", "auto") == "scratch":
        return False
    return any(Path(cfg.model.spec).glob("*.safetensors")) or any(Path(cfg.model.spec).glob("*.bin"))


def load_config(path: str | Path | None = None, overrides=()) -> RunConfig:
    """Defaults, then the TOML file (if any), then the overrides in order (key=value strings and/or mappings of
    dotted keys to typed values: `dwm.config.apply_overrides`). Not yet validated."""
    return C.load(RunConfig, path, overrides)


def help_config() -> str:
    return C.help_text(RunConfig)


def recipe_path(name: str) -> Path:
    """A shipped recipe (src/dwm/recipes/NAME.toml) by name."""
    return RECIPES / f"{name}.toml"


def validate(cfg: RunConfig, world_size: int = 1, check_paths: bool = True) -> Plan | None:
    """Reject every invalid value with a UserError; with check_paths, also the files the run reads, and return the
    Plan (batch sizes, accumulation, steps) for this world size."""
    C.validate(cfg)
    if not check_paths:
        return None
    plan = plan_for_data(cfg, world_size)
    cfg.weighting.check_paths()
    if cfg.weighting.mode == "doge":
        cfg.doge.check_paths()
    section = getattr(SELECTORS.get(cfg.selector.mode), "config_section", None)  # a selector's own section
    if section and hasattr(getattr(cfg, section), "check_paths"):
        getattr(cfg, section).check_paths()
    return plan
