"""Least-squares fits of saturating power laws y = E + A * x^(-alpha) to (x, loss) points, and the
sweep's results files: table (CSV/JSON), fit (JSON) and plot (PNG). No JAX here.

The fit is a variable projection: for a given alpha the model is linear in (E, A), solved by
non-negative least squares (E >= 0, A >= 0); alpha (in [0.005, 3]) minimises the remaining sum of
squares by a grid search refined with a bounded scalar search. x is scaled by its geometric mean
so the linear problem stays well conditioned at any magnitude.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar, nnls

ALPHA_RANGE = (0.005, 3.0)
RESULTS_JSON, RESULTS_CSV, FIT_JSON, PLOT_PNG = "results.json", "results.csv", "fit.json", "scaling.png"
CSV_COLUMNS = ("name", "kind", "d_model", "num_layers", "num_heads", "mlp_dim", "num_experts",
               "experts_per_token", "params_total", "params_embedding", "params_non_embedding",
               "params_active", "params_fit", "tokens", "steps", "flops", "eval_loss", "train_loss",
               "seconds")


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = E + A * x^(-alpha), fitted to ``points`` points with root-mean-square residual ``rmse``."""

    E: float
    A: float
    alpha: float
    rmse: float
    points: int

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A * np.asarray(x, dtype=np.float64) ** -self.alpha

    def describe(self, var: str) -> str:
        return f"L({var}) = {self.E:.4g} + {self.A:.4g} * {var}^-{self.alpha:.4g}  (rmse {self.rmse:.3g})"


def _linear_part(alpha: float, u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(E, A_u, sum of squares) of the best non-negative E, A_u for y = E + A_u * u^-alpha."""
    design = np.stack([np.ones_like(u), u ** -alpha], axis=1)
    (e, a), residual = nnls(design, y)
    return float(e), float(a), float(residual) ** 2


def fit_power_law(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> PowerLaw:
    """Least-squares fit of y = E + A * x^(-alpha); ValueError for fewer than 3 points, or x not
    positive and finite, or y not finite."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D and of one length")
    if len(x) < 3:
        raise ValueError(f"fitting E + A x^-alpha needs at least 3 points, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(x > 0) and np.all(np.isfinite(y))):
        raise ValueError("fit points must have positive finite x and finite losses")
    if len(np.unique(x)) < 2:
        raise ValueError("fit points need at least two different x")
    scale = float(np.exp(np.mean(np.log(x))))
    u = x / scale

    def sse(alpha: float) -> float:
        return _linear_part(alpha, u, y)[2]

    grid = np.geomspace(*ALPHA_RANGE, 400)
    values = [sse(a) for a in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = minimize_scalar(sse, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    alpha = float(best.x) if best.fun <= values[i] else float(grid[i])
    e, a_u, squares = _linear_part(alpha, u, y)
    return PowerLaw(E=e, A=a_u * scale ** alpha, alpha=alpha, rmse=math.sqrt(squares / len(x)),
                    points=len(x))


# ----------------------------------------------------------------------------- results on disk


def write_results(out_dir: Path, rows: list[dict]) -> None:
    """results.json (every field) and results.csv (the table's columns)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_JSON).write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    with open(out_dir / RESULTS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_results(out_dir: Path) -> list[dict]:
    """The runs of a sweep directory (results.json); ValueError when missing or damaged."""
    path = Path(out_dir) / RESULTS_JSON
    try:
        rows = json.loads(path.read_text())["runs"]
    except FileNotFoundError:
        raise ValueError(f"no {RESULTS_JSON} in {out_dir}: run `scaling sweep --out {out_dir}` "
                         "first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a sweep results file ({type(e).__name__})") from None
    needed = {"kind", "params_fit", "flops", "eval_loss", "name"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and needed <= set(r) for r in rows):
        raise ValueError(f"{path} is not a sweep results file (runs lack {sorted(needed)})")
    return rows


def fit_results(rows: list[dict]) -> dict:
    """L(N) and L(C) fits per kind of model (dense, moe) that has at least 3 runs."""
    out: dict = {}
    for kind in sorted({r["kind"] for r in rows}):
        runs = [r for r in rows if r["kind"] == kind and math.isfinite(r["eval_loss"])]
        if len(runs) < 3:
            out[kind] = {"skipped": f"{len(runs)} runs; a fit needs at least 3"}
            continue
        loss = [r["eval_loss"] for r in runs]
        law_n = fit_power_law([r["params_fit"] for r in runs], loss)
        law_c = fit_power_law([r["flops"] for r in runs], loss)
        out[kind] = {"L(N)": dataclasses.asdict(law_n), "L(C)": dataclasses.asdict(law_c),
                     "L(N) text": law_n.describe("N"), "L(C) text": law_c.describe("C")}
    return out


def write_fit(out_dir: Path, rows: list[dict], meta: dict | None = None) -> dict:
    """Fits the rows, writes fit.json and the plot; returns the fit."""
    fits = fit_results(rows)
    (Path(out_dir) / FIT_JSON).write_text(json.dumps({**(meta or {}), "fits": fits}, indent=1) + "\n")
    plot(Path(out_dir) / PLOT_PNG, rows, fits)
    return fits


def plot(path: Path, rows: list[dict], fits: dict) -> None:
    """Two panels, eval loss against N and against C (log x), points and fitted curves per kind."""
    from matplotlib.figure import Figure  # heavy (about a second): only when a plot is drawn

    fig = Figure(figsize=(11, 4.4))
    colors = {"dense": "tab:blue", "moe": "tab:orange"}
    count = rows[0].get("count", "non_embedding").replace("_", "-") if rows else ""
    for panel, (key, law_key, label) in enumerate((("params_fit", "L(N)", f"active {count} parameters N"),
                                                   ("flops", "L(C)", "training FLOPs C"))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for kind in sorted({r["kind"] for r in rows}):
            runs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r[key])
            x = np.array([r[key] for r in runs], np.float64)
            color = colors.get(kind, "tab:green")
            ax.scatter(x, [r["eval_loss"] for r in runs], color=color, zorder=3, label=f"{kind} runs")
            for r in runs:
                ax.annotate(r["name"], (r[key], r["eval_loss"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            law = fits.get(kind, {}).get(law_key)
            if law:
                curve = PowerLaw(**law)
                xs = np.geomspace(x.min() / 1.5, x.max() * 1.5, 200)
                ax.plot(xs, curve(xs), color=color, label=curve.describe(law_key[2]), linewidth=1.2)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("final eval loss (nats/token)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("meshlm scaling sweep: fitted L = E + A x^-alpha", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'name':>12s}{'kind':>7s}{'N fit':>10s}{'N total':>10s}{'tokens':>10s}{'FLOPs':>11s}"
             f"{'eval loss':>11s}{'seconds':>9s}"]
    for r in rows:
        lines.append(f"{r['name']:>12s}{r['kind']:>7s}{r['params_fit']:>10,d}{r['params_total']:>10,d}"
                     f"{r['tokens']:>10,d}{r['flops']:>11.3g}{r['eval_loss']:>11.4f}"
                     f"{r.get('seconds', 0.0):>9.1f}")
    return "\n".join(lines)


def format_fits(fits: dict) -> str:
    lines = []
    for kind, fit in fits.items():
        if "skipped" in fit:
            lines.append(f"{kind}: no fit ({fit['skipped']})")
        else:
            lines += [f"{kind}: {fit['L(N) text']}", f"{kind}: {fit['L(C) text']}"]
    return "\n".join(lines)
