"""The package's shape: no import cycles, small modules, and a new method is one file."""

import ast
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import masquant
from masquant.calibration.pipeline import LayerContext, LayerPlan
from masquant.cli.main import build_parser
from masquant.cli.options import quant_config
from masquant.config import QuantConfig, method_names
from masquant.methods import METHODS, Method, register

from conftest import vl_samples

PACKAGE = Path(masquant.__file__).parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """masquant modules imported anywhere in ``path`` (inside functions and TYPE_CHECKING too)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            prefix = ".".join([*base, *([node.module] if node.module else [])]) if node.level else node.module or ""
            targets = [prefix, *(f"{prefix}.{a.name}" for a in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_the_package_has_no_import_cycles():
    files = list(PACKAGE.rglob("*.py"))
    known = {_module(p) for p in files}
    graph = {_module(p): _imports(p, known) for p in files}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_config_is_a_leaf():
    known = {_module(p) for p in PACKAGE.rglob("*.py")}
    assert _imports(PACKAGE / "config.py", known) == set()


def test_no_module_is_long():
    long = {_module(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


@dataclass
class HalfSettings:
    power: float = field(default=0.5, metadata={"help": "exponent of max|X| in the toy vector"})

    def __post_init__(self) -> None:
        if not 0 <= self.power <= 1:
            raise ValueError(f"power must lie in [0, 1], got {self.power!r}")


@dataclass
class HalfRecord:
    power: float


def _fit(ctx: LayerContext) -> LayerPlan:
    plan = LayerPlan({})
    for group in ctx.groups():
        s = ctx.site(group).absmax().float().clamp_min(1e-3).pow(ctx.settings.power)
        plan.smooth[group.name] = s.expand(len(masquant.Modality), -1).clone() if ctx.smoothed(group) else \
            ctx.identity(group)
        plan.records[group.name] = HalfRecord(ctx.settings.power)
    return plan


@pytest.fixture
def toy_method():
    """A method defined and registered outside the package, as a new method file would."""
    method = register(Method("toy", HalfSettings, _fit, help="max|X|^power, a test method"))
    yield method
    del METHODS["toy"]
    from masquant import config

    del config._SETTINGS["toy"]


def test_a_method_registered_from_one_file_runs_end_to_end(toy_method, vl_model, fresh):
    assert "toy" in method_names()
    config = QuantConfig(method="toy", w_bits=4, power=0.25)
    assert config.settings == HalfSettings(0.25) and QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="power must lie"):
        QuantConfig(method="toy", power=2.0)
    model = fresh(vl_model)
    report = masquant.quantize(model, vl_samples(range(2)), config, progress=False)
    assert report.layers[0].groups["attn_in"] == {"power": 0.25}
    smooth = model.model.language_model.layers[0].self_attn.q_proj.smooth
    assert not torch.equal(smooth, torch.ones_like(smooth))
    # the command line knows it: its flag, its help, and its settings in the config
    parser = build_parser()
    args = parser.parse_args(["quantize", "--model", "m", "--out", "o", "--method", "toy", "--power", "0.75"])
    assert quant_config(args) == QuantConfig(method="toy", w_bits=4, power=0.75)
    quantize_help = next(a for a in parser._subparsers._group_actions[0].choices.values()
                         if "--power" in a.format_help()).format_help()
    assert "max|X|^power, a test method" in quantize_help and "[toy]" in quantize_help


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_cli_flag_of_a_method_reaches_its_settings(method):
    """Each method's own settings have a flag; a flag of another method is refused, naming both."""
    parser = build_parser()
    settings = METHODS[method].settings
    for f in dataclasses.fields(settings):
        assert f.metadata.get("help"), f"{method}.{f.name} has no help"
    others = sorted({f.name for m in METHODS.values() for f in dataclasses.fields(m.settings)}
                    - {f.name for f in dataclasses.fields(settings)})
    base = ["quantize", "--model", "m", "--out", "o", "--method", method]
    if others:
        flag = "--" + others[0].replace("_", "-")
        value = "1" if flag not in ("--whiten", "--cmc-guard") else None
        args = parser.parse_args([*base, flag, *([value] if value else [])])
        with pytest.raises(ValueError, match=f"--method {method} takes no {flag}"):
            quant_config(args)
    assert quant_config(parser.parse_args(base)).settings == settings()


def test_cli_flags_parse_ranks_lambdas_and_switches(capsys):
    parser = build_parser()
    base = ["quantize", "--model", "m", "--out", "o"]
    config = quant_config(parser.parse_args([*base, "--rank", "0.05", "--lambdas", "vision=0.2,audio=0.5",
                                             "--no-whiten", "--group-size", "64", "--no-w-symmetric"]))
    assert config.rank == 0.05 and config.lambdas == {"vision": 0.2, "audio": 0.5} and config.whiten is False
    assert config.w_group_size == 64 and config.w_symmetric is False
    assert (config.method, config.w_bits) == ("masquant", 4)  # the command's own defaults
    assert quant_config(parser.parse_args([*base, "--rank", "16"])).rank == 16
    assert quant_config(parser.parse_args([*base, "--rank", "ratio:0.05,floor:32"])).rank == "ratio:0.05,floor:32"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--lambdas", "vision"])
    assert "--lambdas takes 'auto' or modality=weight pairs" in capsys.readouterr().err
