"""The results of the checks: :class:`GradcheckReport`, and those of the checks at a tie
(:class:`SubgradientReport`, :class:`FrozenTreeReport`), with their verdicts and text."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .diagnosis import Diagnosis


@dataclass
class SubgradientReport:
    """Result of :func:`check_subgradient`.

    ``min_slack`` is the smallest, over the trials, of
    ``T1(d + h) - T1(d) - <g, h>``, which must be >= 0 (up to ``tolerance``)
    when ``g`` is a subgradient; ``strict`` counts the trials where it was
    clearly positive, i.e. where the tie made a difference.
    """

    trials: int
    scale: float
    min_slack: float
    strict: int
    tolerance: float
    mst_margin: float

    @property
    def passed(self) -> bool:
        return self.min_slack >= -self.tolerance

    def __str__(self) -> str:
        verdict = "holds" if self.passed else "VIOLATED"
        return (f"subgradient inequality T1(d + h) >= T1(d) + <g, h> {verdict} in {self.trials} random "
                f"directions of size {self.scale:.2g} (min slack {self.min_slack:.3g}, tolerance "
                f"{self.tolerance:.2g}; strict in {self.strict}); MST margin {self.mst_margin:.3g}")


def _step_verdict(jumps: int, max_rel_err: float, tolerance: float, max_abs_err: float = math.inf,
                  abs_floor: float = 0.0) -> str:
    """A finite-difference comparison's verdict: ``inconclusive`` if any step left the smooth
    piece (a jump), else ``ok`` when the relative error is within ``tolerance`` or the absolute
    error within ``abs_floor`` (the rounding central differences cannot resolve, see
    :func:`~toponeuro.gradcheck.finite_differences._abs_floor`), else ``FAIL``."""
    if jumps:
        return "inconclusive"
    return "ok" if max_rel_err <= tolerance or max_abs_err <= abs_floor else "FAIL"


@dataclass
class FrozenTreeReport:
    """At a tie, autograd's parameter gradient against finite differences of the frozen-tree piece.

    The piece is ``theta -> T(d(theta)[edges])``: the formula on ``d``
    gathered at the tree the backend chose at the point (see
    :func:`check_model_gradient` for why this is the right comparison).

    Attributes
    ----------
    edges : list of (int, int)
        The frozen tree: the backend's death edges at the point, canonical order.
    max_abs_err, max_rel_err : float
        As in :class:`GradcheckReport`, against the piece's central differences.
    step, min_step : float
        The largest and smallest finite-difference steps taken.
    jumps : int
        Evaluations whose state (ReLU pattern, signs of rho on the frozen
        edges, constant neurons) differed from the point's; the tree is fixed,
        so a change of MST is not a jump.
    tolerance : float
    abs_floor : float
        As in :class:`GradcheckReport`.
    """

    edges: list
    max_abs_err: float
    max_rel_err: float
    step: float
    min_step: float
    jumps: int
    tolerance: float
    abs_floor: float = 0.0

    @property
    def verdict(self) -> str:
        """``ok``, ``FAIL``, or ``inconclusive`` (every step tried left the piece's smooth part)."""
        return _step_verdict(self.jumps, self.max_rel_err, self.tolerance, self.max_abs_err, self.abs_floor)

    @property
    def passed(self) -> bool:
        return self.verdict == "ok"

    def headline(self) -> str:
        return {"ok": "parameters agree with the frozen tree",
                "FAIL": "parameters DISAGREE with the frozen tree",
                "inconclusive": "frozen-tree comparison inconclusive (nothing verified)"}[self.verdict]

    def __str__(self) -> str:
        return (f"{self.headline()}: autograd's parameter gradient against central differences of T(d[tree]) with the "
                f"tree fixed to the backend's {len(self.edges)} edges at the point: max abs err "
                f"{self.max_abs_err:.3g}, max rel err {self.max_rel_err:.3g} (tolerance {self.tolerance:.1g}), "
                f"steps {self.min_step:.3g} to {self.step:.3g}, {self.jumps} evaluation(s) off the piece")


@dataclass
class GradcheckReport:
    """Autograd against central finite differences at one point.

    Attributes
    ----------
    formula, dissimilarity, backend : str or None
        ``None`` where the formula does not use them.
    wrt : {"activations", "parameters"}
    size : int
        Number of entries differentiated.
    max_abs_err : float
        ``max |g_autograd - g_fd|``.
    max_rel_err : float
        ``max_abs_err / max(max |g_fd|, max |g_autograd|)``: the error relative
        to the size of the gradient (entrywise ratios blow up on entries that
        are 0 by structure).
    step : float
        The largest finite-difference step ``h_k`` taken (``(f(x + h_k e_k) -
        f(x - h_k e_k)) / 2 h_k``); each entry has its own, relative to its
        scale (see ``min_step``).
    jumps : int
        Finite-difference evaluations whose combinatorial state (tree, signs
        of the gathered rho, constant neurons, ReLU pattern) differed from the
        point's: 0 means the step stayed on one smooth piece.
    diagnosis : :class:`Diagnosis`
    tolerance : float
        The largest acceptable ``max_rel_err`` at a differentiable point.
    abs_floor : float
        An absolute error up to this passes too, whatever ``max_rel_err``: the
        rounding of the central differences, ``8 * eps * |R(x)| / min_step``
        (float64 ``eps``; each evaluation of ``R`` is exact to a few epsilons
        of its value). A gradient that is 0 up to rounding (1e-16
        against 0) has a relative error of 1, yet nothing is wrong with it.
    subgradient : :class:`SubgradientReport` or None
        T1 at a tie: the check that replaces the finite-difference comparison.
    seconds : float
    min_step : float or None
        The smallest step ``h_k`` taken (``None``: the same as ``step``).
    frozen_tree : :class:`FrozenTreeReport` or None
        Model checks of T1/T2 at a point where the tie is the only kink: the
        parameter gradient against finite differences of the frozen-tree piece.
    """

    formula: str
    dissimilarity: str | None
    backend: str | None
    wrt: str
    size: int
    max_abs_err: float
    max_rel_err: float
    step: float
    jumps: int
    diagnosis: Diagnosis
    tolerance: float
    subgradient: SubgradientReport | None = None
    seconds: float = 0.0
    min_step: float | None = None
    frozen_tree: FrozenTreeReport | None = None
    abs_floor: float = 0.0

    @property
    def verdict(self) -> str:
        """``ok``, ``FAIL``, ``kink`` (not differentiable: disagreement expected),
        ``subgradient ok``/``subgradient FAIL`` (T1 at a tie), or ``inconclusive``
        (differentiable, but so close to a kink that no finite-difference step
        stays on one smooth piece). A model check at a tie that is the only
        kink adds the frozen-tree comparison of the parameter gradient:
        ``subgradient ok + frozen tree ok`` (T1), ``frozen tree ok`` (T2), with
        ``FAIL`` or ``inconclusive`` in place of ``ok`` where that part was."""
        parts = []
        if self.subgradient is not None:
            parts.append("subgradient ok" if self.subgradient.passed else "subgradient FAIL")
        if self.frozen_tree is not None:
            parts.append(f"frozen tree {self.frozen_tree.verdict}")
        if parts:
            return " + ".join(parts)
        if not self.diagnosis.differentiable:
            return "kink"
        return _step_verdict(self.jumps, self.max_rel_err, self.tolerance, self.max_abs_err, self.abs_floor)

    @property
    def failed(self) -> bool:
        """The tool found a wrong gradient (``FAIL`` or ``subgradient FAIL``)."""
        return "FAIL" in self.verdict

    @property
    def inconclusive(self) -> bool:
        """Nothing wrong found, but something left unverified: differentiable, yet every step tried left
        the point's smooth piece; or, at a tie, the frozen-tree comparison of the parameter gradient."""
        if self.failed:
            return False
        return self.verdict == "inconclusive" or (self.frozen_tree is not None
                                                  and self.frozen_tree.verdict == "inconclusive")

    @property
    def passed(self) -> bool:
        """The gradient was verified (``ok``, ``subgradient ok``) or the point is a kink (``kink``:
        no derivative to compare with; autograd returns that of an adjacent smooth piece).

        False where a wrong gradient was found (:attr:`failed`) *and* where the
        check was :attr:`inconclusive`: an unverified gradient is not a pass.
        """
        return not (self.failed or self.inconclusive)

    def row(self) -> list[str]:
        d = self.diagnosis
        return [
            self.formula,
            self.dissimilarity or "-",
            self.backend or "-",
            f"{self.max_abs_err:.2e}",
            f"{self.max_rel_err:.2e}",
            f"{self.step:.1e}",
            "-" if d.mst_margin is None else f"{d.mst_margin:.2e}",
            "-" if d.min_abs_rho is None else f"{d.min_abs_rho:.2e}",
            "yes" if d.differentiable else "no",
            self.verdict,
        ]

    def _steps_text(self) -> str:
        if self.min_step is None or self.min_step == self.step:
            return f"step {self.step:.3g}"
        return f"steps {self.min_step:.3g} to {self.step:.3g} (each entry's relative to its scale)"

    def label(self) -> str:
        return f"{self.formula} / {self.dissimilarity or '-'} / {self.backend or '-'}"

    def note(self) -> str:
        """One line on a row whose verdict is not ``ok``: why, and what was checked instead."""
        d = self.diagnosis
        if self.verdict == "inconclusive":
            margin = "" if d.mst_margin is None else f", MST margin {d.mst_margin:.2g}"
            return (f"{self.label()}: inconclusive, nothing verified: the point is differentiable{margin}, but "
                    f"{self.jumps} of {2 * self.size} finite-difference evaluations left its smooth piece with "
                    f"the last steps tried (up to {self.step:.2g}): a kink is closer than such steps resolve.")
        if d.differentiable:
            return f"{self.label()}: {self.verdict}: " + d.sentence()
        text = f"{self.label()}: {self.verdict}: " + "; ".join(d.reasons)
        if self.subgradient is not None:
            sub = self.subgradient
            text += (f"; subgradient inequality {'holds' if sub.passed else 'VIOLATED'} in {sub.trials} "
                     f"directions (min slack {sub.min_slack:.2g})")
        if self.frozen_tree is not None:
            ft = self.frozen_tree
            text += (f"; {ft.headline()} (max rel err {ft.max_rel_err:.2g}, "
                     f"{ft.jumps} evaluation(s) off the piece)")
        return text

    def __str__(self) -> str:
        lines = [
            f"gradcheck {self.formula} / {self.dissimilarity or '-'} / {self.backend or '-'} "
            f"w.r.t. {self.size} {self.wrt}: {self.verdict}",
            f"  max abs err {self.max_abs_err:.3g}, max rel err {self.max_rel_err:.3g} "
            f"(tolerance {self.tolerance:.1g}, or abs err <= {self.abs_floor:.2g}: rounding), {self._steps_text()}, "
            f"{self.jumps} finite-difference evaluation(s) off the point's smooth piece",
            "  " + self.diagnosis.sentence(),
        ]
        if self.verdict == "inconclusive":
            lines.append("  Inconclusive: no step tried stayed on the point's smooth piece, so the comparison "
                         "above verifies nothing (neither agreement nor disagreement).")
        if self.diagnosis.constant_neurons and self.diagnosis.differentiable:
            lines.append(f"  constant neurons {self.diagnosis.constant_neurons} (harmless for this formula)")
        if self.diagnosis.deaths_std is not None:
            lines.append(f"  std of the deaths {self.diagnosis.deaths_std:.3g}")
        if self.subgradient is not None:
            lines.append("  " + str(self.subgradient))
        if self.frozen_tree is not None:
            lines.append("  " + str(self.frozen_tree))
        return "\n".join(lines)
