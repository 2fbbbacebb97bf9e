"""``bdseal list``: everything a run can name — datasets, models, attacks (with each seed paper's presets),
defenses with their threat model, bench configs — one line each.

Descriptions of the built-in names live here (one place, short, for users); a name registered by a plugin
falls back to the first line of its docstring. A defense's threat model is read from the registry
(``needs_clean``, ``post_hoc``) and its default config (how much clean data it asks for)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib import resources
from typing import Any

from omegaconf import OmegaConf

DATASETS = {
    "digits": "scikit-learn's 1,797 handwritten digits, 10 classes, upscaled to 32x32 RGB; embedded, no download",
    "synthetic": "generated class patterns (colour + oriented sinusoid + noise), any size; for tests",
    "cifar10": "CIFAR-10 (50k/10k, 32x32, 10 classes): $BDSEAL_CIFAR10, dataset.root=/abs/path or +dataset.options.download=true",
    "cifar100": "CIFAR-100 fine labels (100 classes): $BDSEAL_CIFAR100, dataset.root=/abs/path or +dataset.options.download=true",
    "gtsrb": "German traffic signs (43 classes), official layout or .npz: $BDSEAL_GTSRB or dataset.root=",
    "imagefolder": "any root/{train,test}/<class>/* image tree, resized (ImageNet subsets, VGGFace2, ...)",
}

MODELS = {
    "small_half": "fast 3-block CNN, widths 32/128/128 (CPU default)",
    "small": "fast 3-block CNN, widths 64/256/256",
    "resnet18": "CIFAR ResNet-18 (3x3 stem, 512-d features)",
    "preact_resnet18": "PreAct-ResNet-18 (PGBD's and BackdoorBench's model)",
    "vgg16": "VGG-16 with batch norm",
    "densenet121": "DenseNet-121, CIFAR stem",
    "resnet50": "ResNet-50 (ImageNet stem from 64 px)",
}

ATTACKS = {
    "badnets": "BadNets: a fixed patch (3x3 checkerboard) stamped on poisoned images, labels flipped to the target",
    "blend": "Blend: the whole image alpha-blended with a fixed pattern",
    "trojan": "TrojanNN: a trigger optimised inside a logo mask to fire chosen neurons",
    "wanet": "WaNet: a fixed smooth warp of the image (invisible)",
    "sig": "SIG: an additive sinusoidal signal; clean-label (target-class images, labels kept)",
    "lc": "label-consistent: adversarially hardened target-class images with corner patches; clean-label",
    "freq": "Freq / CTRL: a trigger in the DCT of the chroma channels; clean-label",
    "adap_patch": "Adap-Patch: four low-opacity patch triggers, with cover samples that keep true labels",
    "adap_blend": "Adap-Blend: a partially masked blend trigger, with cover samples",
    "issba": "ISSBA: a sample-specific invisible residual from a trained encoder",
    "iab": "input-aware dynamic backdoor: a generator draws a trigger per image",
    "lotus": "Lotus: partitioned triggers on one source class, with trigger-focusing covers",
    "combat": "COMBAT: clean-label low-pass generator noise trained with a surrogate",
}

# name -> (what it does, what it needs to know about the target)
DEFENSES = {
    "none": ("plain training on the poisoned data: the backdoored model M_B", "no"),
    "gssd": ("GSSD: SimCLR features + per-class flows find the target class and its poisons; retrain, relabel, fine-tune", "no"),
    "pgbd": ("PGBD: fine-tune M_B pulling activations towards clean class prototypes, away from the target's", "known, or found by Neural Cleanse"),
    "nt_pgbd": ("NT-PGBD: PGBD with no target; the assumed target cycles over the classes", "no"),
    "st_pgbd": ("ST-PGBD: PGBD with synthetic poisoned activations from the Neural Cleanse trigger", "found by Neural Cleanse"),
    "pgrl": ("PGRL: trains from scratch on samples whose labels agree with clean prototypes (LCV), weighted CE (WCE)", "no"),
    "lcv": ("PGRL's label-consistency verification alone (ablation)", "no"),
    "wce": ("PGRL's weighted cross-entropy alone (ablation)", "no"),
    "vibe": ("VIBE: variational EM over latent clean labels with an optimal-transport E-step (variant keys)", "no"),
    "vibe_ss_f": ("VIBE-SS-F: self-supervised backbone, input-conditioned label corruption", "no"),
    "vibe_ss_a": ("VIBE-SS-A: self-supervised backbone, class-level label corruption", "no"),
    "vibe_fm_f": ("VIBE-FM-F: frozen foundation backbone (local checkpoint), input-conditioned corruption", "no"),
    "vibe_fm_a": ("VIBE-FM-A: frozen foundation backbone (local checkpoint), class-level corruption", "no"),
    "ft": ("fine-tune M_B on the clean set (baseline)", "no"),
    "nad": ("neural attention distillation from a fine-tuned teacher into M_B (baseline)", "no"),
}


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    threat: str = ""


def _conf(*parts: str) -> Any:
    node = resources.files("bdseal.conf")
    for p in parts:
        node = node / p
    return node


def _doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def _first_sentence(yaml_text: str) -> str:
    """The leading ``#`` comment block of a config file up to its first sentence end (a full stop before a
    space, not a number; or a colon outside parentheses), at most 160 characters."""
    lines = []
    for line in yaml_text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        rest = text[i + 1:].lstrip()
        ends = ch == "." and text[i + 1:i + 2] in ("", " ") and not rest[:1].isdigit()  # "Fig. 2" goes on
        if ends or (ch == ":" and depth == 0):
            text = text[:i + 1] if ch == "." else text[:i]
            break
    return text if len(text) <= 160 else text[:157].rstrip() + "..."


def datasets() -> list[Entry]:
    from bdseal.data.sources import SOURCES, list_datasets

    return [Entry(n, DATASETS.get(n) or _doc_line(SOURCES[n])) for n in list_datasets()]


def models() -> list[Entry]:
    from bdseal.models import MODELS as BUILDERS
    from bdseal.models import list_models

    return [Entry(n, MODELS.get(n) or _doc_line(BUILDERS[n])) for n in list_models()]


def attacks() -> list[Entry]:
    from bdseal.attacks.base import _ATTACKS, list_attacks

    return [Entry(n, ATTACKS.get(n) or _doc_line(_ATTACKS[n])) for n in list_attacks()]


def attack_presets() -> dict[str, list[str]]:
    """Seed paper -> its attack recipes, usable as ``attack=<paper>/<name>`` (``bdseal/conf/attack/<paper>/``)."""
    root = _conf("attack")
    return {d.name: sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml"))
            for d in sorted(root.iterdir(), key=lambda d: d.name) if d.is_dir() and not d.name.startswith("_")}


def defense_config(name: str) -> dict[str, Any]:
    """The default config of ``defense=<name>`` (composed, so presets inherit their base's keys)."""
    from bdseal.experiment.config import compose_config

    node = compose_config([f"defense={name}"]).defense
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def threat_model(name: str) -> str:
    """``clean data: ...; target: ...; post-hoc: ...`` from the registry and the default config."""
    from bdseal.defenses import get_defense

    spec = get_defense(name)
    clean = "no"
    if spec.needs_clean:
        cfg = defense_config(name) if _conf("defense", f"{name}.yaml").is_file() else {}
        if cfg.get("clean_per_class"):
            clean = f"{cfg['clean_per_class']} per class"
        elif cfg.get("clean_fraction"):
            clean = f"{cfg['clean_fraction']:.0%} of the held-out pool"
        else:
            clean = "the held-out pool"
    target = DEFENSES.get(name, ("", "no"))[1]
    post_hoc = "yes, repairs M_B" if spec.post_hoc else "no, trains on the poisoned set"
    return f"clean data: {clean} | target: {target} | post-hoc: {post_hoc}"


def defenses() -> list[Entry]:
    from bdseal.defenses import get_defense, list_defenses

    return [Entry(n, DEFENSES[n][0] if n in DEFENSES else _doc_line(get_defense(n).fn), threat_model(n))
            for n in list_defenses()]


def benches() -> list[Entry]:
    root = _conf("bench")
    return [Entry(f.name[:-5], _first_sentence(f.read_text())) for f in sorted(root.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")]


def render() -> str:
    """The text ``bdseal list`` prints."""
    out: list[str] = []

    def section(title: str, usage: str, entries: list[Entry]) -> None:
        out.append(f"{title} ({usage})")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            out.append(f"  {e.name:<{width}}  {e.description}")
            if e.threat:
                out.append(f"  {'':<{width}}  [{e.threat}]")
        out.append("")

    section("datasets", "dataset=NAME", datasets())
    section("models", "model=NAME", models())
    section("attacks", "attack=NAME", attacks())
    out.append("attack presets: each seed paper's recipe (attack=PAPER/NAME)")
    for paper, names in attack_presets().items():
        out.append(f"  {paper}: " + ", ".join(f"{paper}/{n}" for n in names))
    out.append("")
    section("defenses", "defense=NAME", defenses())
    section("bench configs", "bdseal bench bench=NAME", benches())
    return "\n".join(out).rstrip() + "\n"
