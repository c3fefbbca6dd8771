"""Compute-optimal planning: Chinchilla's 20-tokens-per-parameter rule and fitted loss L(N, D), and
Kaplan et al.'s L(N) for comparison. Pure arithmetic, C = 6 * N * D throughout; no JAX.

Constants: Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), approach 3:
L(N, D) = E + A / N^alpha + B / D^beta with E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28 (N in
parameters, D in tokens, L in nats per token of their tokenizer). Kaplan et al. 2020 ("Scaling Laws
for Neural Language Models"): L(N) = (N_c / N)^alpha_N with N_c 8.8e13 non-embedding parameters,
alpha_N 0.076, trained to convergence.
"""

from __future__ import annotations

import dataclasses
import math

TOKENS_PER_PARAM = 20.0  # Chinchilla's rule of thumb
FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D: forward 2, backward 4


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def g(self) -> float:
        """N_opt = g * (C/6)^(beta / (alpha + beta)), from d/dN L(N, C / (6N)) = 0."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    def optimal_params(self, flops: float) -> float:
        return self.g * (flops / FLOPS_PER_PARAM_TOKEN) ** self.a

    def flops_for_params(self, n: float) -> float:
        """The budget whose compute-optimal model has ``n`` parameters."""
        return FLOPS_PER_PARAM_TOKEN * (n / self.g) ** (1 / self.a)

    def flops_for_tokens(self, d: float) -> float:
        """The budget whose compute-optimal model trains on ``d`` tokens (D_opt = (C/6) / N_opt)."""
        return FLOPS_PER_PARAM_TOKEN * (d * self.g) ** (1 / (1 - self.a))


@dataclasses.dataclass(frozen=True)
class KaplanLaw:
    """L(N) = (n_c / N)^alpha_n, N non-embedding parameters."""

    n_c: float = 8.8e13
    alpha_n: float = 0.076

    def loss(self, n: float) -> float:
        return (self.n_c / n) ** self.alpha_n


CHINCHILLA = ChinchillaLaw()
KAPLAN = KaplanLaw()
PARAM_MULTIPLES = (2, 10, 100)


def _allocation(name: str, n: float, d: float, law: ChinchillaLaw) -> dict[str, float | str]:
    return {"method": name, "params": n, "tokens": d, "flops": FLOPS_PER_PARAM_TOKEN * n * d,
            "tokens_per_param": d / n, "loss": law.loss(n, d)}


def plan(*, flops: float | None = None, params: float | None = None, tokens: float | None = None,
         tokens_per_param: float = TOKENS_PER_PARAM, law: ChinchillaLaw = CHINCHILLA,
         kaplan: KaplanLaw = KAPLAN) -> dict:
    """The compute-optimal allocation given exactly one of a FLOP budget, a parameter count or a
    token count, by the tokens-per-parameter rule and by the fitted law; each with its predicted
    loss, plus Kaplan's L(N) and the loss change from multiplying N. ValueError (one line) for a
    figure that is not a positive finite number or that leaves less than one parameter or token."""
    given = {k: v for k, v in (("flops", flops), ("params", params), ("tokens", tokens)) if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of --flops, --params, --tokens")
    (kind, value), = given.items()
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"--{kind} must be a positive finite number, got {value}")
    if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise ValueError(f"--tokens-per-param must be a positive finite number, got {tokens_per_param}")
    try:
        rule, fitted = _allocations(kind, value, tokens_per_param, law)
    except OverflowError:
        rule = fitted = {"params": math.inf}
    for row in (rule, fitted):
        figures = [row.get(k, math.inf) for k in ("params", "tokens", "flops", "loss")]
        if not all(math.isfinite(x) for x in figures):
            raise ValueError(f"--{kind} {value:g} is too large to plan for (the numbers overflow)")
        if row["params"] < 1 or row["tokens"] < 1:
            raise ValueError(f"--{kind} {value:g} is too small: the plan has {row['params']:.3g} "
                             f"parameters and {row['tokens']:.3g} tokens (at least 1 each)")
    n = rule["params"]
    base = kaplan.loss(n)
    multiples = [{"multiple": k, "params": k * n, "kaplan_loss": kaplan.loss(k * n),
                  "kaplan_delta": kaplan.loss(k * n) - base,
                  "chinchilla_loss_same_tokens": law.loss(k * n, rule["tokens"]),
                  "chinchilla_delta_same_tokens": law.loss(k * n, rule["tokens"]) - rule["loss"]}
                 for k in PARAM_MULTIPLES]
    return {"given": {kind: value}, "tokens_per_param": tokens_per_param,
            "chinchilla_law": dataclasses.asdict(law), "kaplan_law": dataclasses.asdict(kaplan),
            "rule": rule, "fitted": fitted,
            "kaplan": {"params": n, "loss": base, "multiples": multiples}}


def _allocations(kind: str, value: float, r: float, law: ChinchillaLaw) -> tuple[dict, dict]:
    """(the rule's allocation, the fitted law's) for a given budget, parameter or token count."""
    if kind == "flops":
        n_rule = math.sqrt(value / (FLOPS_PER_PARAM_TOKEN * r))
        n_law = law.optimal_params(value)
        c_law = value
    elif kind == "params":
        n_rule = n_law = value
        c_law = law.flops_for_params(value)
    else:
        n_rule = value / r
        c_law = law.flops_for_tokens(value)
        n_law = c_law / (FLOPS_PER_PARAM_TOKEN * value)
    rule = _allocation(f"rule ({r:g} tokens/param)", n_rule, r * n_rule, law)
    fitted = _allocation("fitted L(N, D)", n_law, c_law / (FLOPS_PER_PARAM_TOKEN * n_law), law)
    return rule, fitted


def format_count(x: float, unit: str = "") -> str:
    """1.23M, 4.5B, 6.7T; plain below a thousand."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def format_plan(result: dict) -> str:
    """The plan as a small text report."""
    (kind, value), = result["given"].items()
    law, kap = result["chinchilla_law"], result["kaplan_law"]
    given = f"{value:.3g} FLOPs" if kind == "flops" else format_count(value) + f" {kind}"
    lines = [f"Compute-optimal plan for {given}  (C = 6 N D)", "",
             f"{'':36s}{'params N':>12s}{'tokens D':>12s}{'FLOPs C':>12s}{'tokens/N':>10s}"
             f"{'loss':>8s}"]
    for row in (result["rule"], result["fitted"]):
        lines.append(f"{'Chinchilla ' + row['method']:36s}{format_count(row['params']):>12s}"
                     f"{format_count(row['tokens']):>12s}{row['flops']:>12.3g}"
                     f"{row['tokens_per_param']:>10.1f}{row['loss']:>8.3f}")
    lines += ["", f"loss = Chinchilla L(N, D) = {law['E']} + {law['A']} / N^{law['alpha']} + "
              f"{law['B']} / D^{law['beta']}  (Hoffmann et al. 2022, approach 3)", "",
              f"Kaplan et al. 2020, L(N) = ({kap['n_c']:.3g} / N)^{kap['alpha_n']} at N = "
              f"{format_count(result['kaplan']['params'])} (the rule's N; Kaplan counts non-embedding "
              f"parameters): {result['kaplan']['loss']:.3f}",
              f"{'params x':>10s}{'N':>10s}{'Kaplan L(N)':>13s}{'change':>9s}"
              f"{'Chinchilla, same D':>20s}{'change':>9s}"]
    for m in result["kaplan"]["multiples"]:
        lines.append(f"{m['multiple']:>10d}{format_count(m['params']):>10s}{m['kaplan_loss']:>13.3f}"
                     f"{m['kaplan_delta']:>+9.3f}{m['chinchilla_loss_same_tokens']:>20.3f}"
                     f"{m['chinchilla_delta_same_tokens']:>+9.3f}")
    return "\n".join(lines)
