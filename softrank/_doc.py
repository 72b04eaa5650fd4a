r"""Docstrings written once, complete everywhere, readable in a terminal.

Two mechanisms:

* :func:`compose` (a class decorator) completes an estimator's NumPy-style docstring from the
  shared entries :data:`PARAMETERS` and :data:`ATTRIBUTES`: the ``Parameters`` section is
  rebuilt in the order of the ``__init__`` signature, each parameter taking the class's own
  entry if its docstring has one, else the shared one; the shared attributes the class does not
  document itself are appended to its ``Attributes`` section. Adding a parameter to every
  estimator is one entry in :data:`PARAMETERS` (``tests/test_docs.py`` fails for a parameter
  documented nowhere).
* :func:`terminal_text` rewrites the reStructuredText the docstrings are written in (``:math:``
  roles and ``.. math::`` blocks in TeX, ``:class:`` roles...) into plain text with Unicode
  formulas, for ``help()``. :func:`install` applies it to every softrank module as it is
  imported. The documentation site reads the source docstrings (TeX, rendered by KaTeX);
  the composed estimator docstrings come from :func:`composed_source`.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import re
import sys
import types

__all__ = ["PARAMETERS", "ATTRIBUTES", "compose", "composed_source", "terminal_text",
           "tex_to_text", "install"]

# -- shared entries -----------------------------------------------------------------------------

#: The parameters common to the estimators, one NumPy-style entry each (name line, then the
#: description indented by four spaces). Used by :func:`compose` for every estimator whose
#: ``__init__`` takes the parameter and whose docstring does not document it itself.
PARAMETERS: dict[str, str] = {
    "estimator": """\
estimator : skorch net or Pipeline ending in one
    ``NeuralNetClassifier``, ``NeuralNetBinaryClassifier`` or ``NeuralNetRegressor`` (or a
    :class:`sklearn.pipeline.Pipeline` whose last step is one), fitted or not. A fitted net is
    used as it is and never changed (parameters, buffers, train/eval mode and optimizer state
    stay bit-identical). Wrap it in :class:`sklearn.frozen.FrozenEstimator` to keep it fitted
    through ``clone``.""",
    "lam": """\
lam : 'auto', 'effective', float, dict, torch.Tensor or EffectiveLam, default='auto'
    The weight decay :math:`\\Lambda` of the training objective
    :math:`\\frac1n\\sum_i\\ell_i + \\frac12\\theta^\\top\\Lambda\\theta` (in the units of the
    mean loss per unit squared parameter). 'auto': read from the net's optimizer
    (``weight_decay`` of each parameter group); 'effective': the weight decay plus the
    regularization the training budget imposed, read from the optimizer's state for the net
    as trained (:func:`~softrank.effective_lam` with its defaults; a model of the training
    run, see the stationarity guide); a float: the same λ > 0 for every parameter; a dict
    {parameter name: float}; a tensor of shape (p,) with one λ per parameter; or an
    :class:`~softrank.EffectiveLam`.""",
    "approximation": """\
approximation : {'exact', 'dense', 'gram', 'diagonal', 'kfac', 'ekfac', 'matrix_free'}, \
default='exact'
    How the curvature is represented. 'exact' picks 'dense' (p×p matrix) for small p and
    'gram' (the n·K×n·K kernel) otherwise; 'diagonal', 'kfac' and 'ekfac' are approximations;
    'matrix_free' uses products with the curvature only (stochastic: its standard error is
    ``stderr_``). See the "Which approximation when" guide.""",
    "n_curvature_samples": """\
n_curvature_samples : int or None, default=None
    Estimate the curvature on this many random samples of X (drawn with ``random_state``);
    n, the number of training samples in the formulas, is unchanged. None: all of X.""",
    "batch_size": """\
batch_size : int, default=256
    Samples per batch of the data passes (memory, not results).""",
    "random_state": """\
random_state : int, numpy.random.RandomState or None, default=None
    Seeds the curvature subsample, the stochastic approximations and, when the estimator fits
    the net itself, torch's random number generator during that training (the global state is
    restored afterwards).""",
    "device": """\
device : str, torch.device or None, default=None
    Where the measurement runs (default: the device of the net's module).""",
    "params": """\
params : None, list of str or callable, default=None
    Which parameters count: None, all that require grad; a list of parameter names; or a
    callable ``(name, parameter) -> bool`` (for example the head of a pretrained backbone).""",
    "prefit": """\
prefit : {'auto', True, False}, default='auto'
    'auto': fit a clone of the net only if it is not fitted; True: require a fitted net (an
    error otherwise); False: always fit a clone.""",
    "memory_budget": """\
memory_budget : int, str or None, default=None
    Bytes (an int, or a string such as '2GB' or '512MiB') the curvature representations may
    use. ``fit`` compares the estimate of :func:`softrank.memory.estimate_memory` for every
    curvature the measure builds with it, after training the net (if it does) and before any
    measuring data pass, and raises a :class:`MemoryError` naming the approximation, the
    estimate, the budget and the options that would fit. None: the same check against the
    memory available at that moment (free RAM within the process's limits, or free device
    memory on CUDA). :meth:`estimate_memory` lists the estimates in advance.""",
    "verbose": """\
verbose : bool or int, default=False
    Show progress bars (tqdm, on standard error) for the data passes, the Gram kernel build
    and the Lanczos and conjugate-gradient iterations of ``fit``.""",
    "finish": """\
finish : bool or dict, default=False
    Every estimate assumes the net sits at the minimizer of its training objective
    :math:`\\frac1n\\sum_i\\ell_i + \\frac12\\theta^\\top\\Lambda\\theta`. True: measure a
    finished copy instead — :func:`softrank.finish_training` (full-batch L-BFGS with a
    strong-Wolfe line search on that objective, from the trained θ, on the fit data, with this
    estimator's ``lam``, ``params`` and ``device``); a dict passes its options (``tol``,
    ``max_iter``, ``history_size``, ``batch_size``). ``estimator_`` is then the finished net
    and ``predict`` uses it; the net given is not changed. Finish when the estimates serve to
    choose Λ or an architecture; the finished net is not the net as trained (finishing undoes
    what early stopping and the learning rate did).""",
}

#: The fitted attributes every estimator sets (``fit``), one entry each.
ATTRIBUTES: dict[str, str] = {
    "measure_": """\
measure_ : float
    The measure (see above), in its own units.""",
    "gap_": """\
gap_ : float
    The estimated generalization gap: expected test loss minus training loss, in the units of
    the loss (nats per sample for cross-entropy).""",
    "train_loss_": """\
train_loss_ : float
    Mean loss of the fitted net on the training data X, y (evaluation mode).""",
    "stderr_": """\
stderr_ : float or None
    Standard error of ``measure_`` where it is estimated stochastically ('matrix_free'
    approximations; ApproxLOO's 'nystrom', 'cavity' and 'subsample' methods, over the sampled
    points),
    else None.""",
    "lam_": """\
lam_ : float, dict, torch.Tensor or None
    The weight decay used (``lam`` resolved; None for measures without λ).""",
    "n_train_": """\
n_train_ : int
    n: the number of samples the net trained on (skorch's ``train_split`` holds out 20 % by
    default; this counts what it actually used).""",
    "n_train_source_": """\
n_train_source_ : str
    How ``n_train_`` was found (the net's history or its ``train_split``).""",
    "n_samples_fit_": """\
n_samples_fit_ : int
    Number of samples of X passed to ``fit``.""",
    "approximation_": """\
approximation_ : str
    The curvature representation used ('exact' resolved to 'dense' or 'gram').""",
    "result_": """\
result_ : softrank.measures.MeasureResult
    Everything the measure returned: value, gap, n, λ, approximation and ``diagnostics``.""",
    "estimator_": """\
estimator_ : skorch net or Pipeline
    The fitted net that was measured: ``estimator`` itself if it was fitted, else a fitted
    clone.""",
    "n_features_in_": """\
n_features_in_ : int
    Number of features of X (scikit-learn convention).""",
    "classes_": """\
classes_ : ndarray of shape (n_classes,)
    Class labels (classifiers only).""",
    "stationarity_": """\
stationarity_ : float or None
    Relative stationarity
    :math:`r = \\|\\nabla(\\frac1n\\sum_i\\ell_i + \\frac12\\theta^\\top\\Lambda\\theta)\\| /
    \\|\\Lambda\\theta\\|` of the measured net on the fit data (one gradient pass; 0 at the
    minimizer every estimate assumes). None when there is no Λ. Above
    ``softrank.stationarity.STATIONARITY_THRESHOLD`` (1), ``fit`` warns with
    :class:`softrank.NotStationaryWarning`.""",
    "finish_result_": """\
finish_result_ : softrank.FinishResult or None
    What finishing did (iterations, r and loss before and after), or None without
    ``finish``.""",
}

# -- NumPy-style sections -----------------------------------------------------------------------

_HEADER = re.compile(r"^([A-Z][A-Za-z ]*)\n(-{3,})$", re.M)
_ENTRY = re.compile(r"^([A-Za-z_*][\w*]*)\s*(?::|$)")


def _sections(doc: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first section, [(title, body), ...]) of a cleaned docstring."""
    heads = list(_HEADER.finditer(doc))
    if not heads:
        return doc.rstrip() + "\n", []
    out = []
    for k, h in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(doc)
        out.append((h.group(1), doc[h.end() + 1:end].strip("\n")))
    return doc[:heads[0].start()], out


def _entries(body: str) -> dict[str, str]:
    """{name: entry} of a Parameters/Attributes section body (unindented name lines)."""
    out: dict[str, str] = {}
    name = None
    for line in body.splitlines():
        m = _ENTRY.match(line) if line and not line[0].isspace() else None
        if m:
            name = m.group(1)
            out[name] = line
        elif name is not None:
            out[name] += "\n" + line
    return {k: v.rstrip() for k, v in out.items()}


#: numpydoc's order of the sections of a class docstring
_ORDER = ["Parameters", "Attributes", "Methods", "Raises", "Warns", "See Also", "Notes",
          "References", "Examples"]

#: composed docstrings (TeX kept) by "module.qualname", for the documentation build
_SOURCES: dict[str, str] = {}


def _signature_names(cls) -> list[str]:
    """The named parameters of ``cls.__init__``; all of :data:`PARAMETERS` for a base class
    without its own ``__init__``."""
    import inspect

    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    names = [p.name for p in inspect.signature(cls.__init__).parameters.values()
             if p.name != "self" and p.kind not in kinds]
    return names or list(PARAMETERS)


def compose(cls):
    """Class decorator: complete ``cls.__doc__`` with the shared :data:`PARAMETERS` and
    :data:`ATTRIBUTES` (see the module docstring); the result is kept for the documentation
    build (:func:`composed_source`) and ``__doc__`` becomes its terminal form."""
    import inspect

    doc = inspect.cleandoc(cls.__doc__ or "")
    intro, sections = _sections(doc)
    titles = [t for t, _ in sections]
    own_params = _entries(dict(sections).get("Parameters", ""))
    own_attrs = _entries(dict(sections).get("Attributes", ""))
    params = [own_params.get(n) or PARAMETERS.get(n) for n in _signature_names(cls)]
    params_body = "\n".join(p for p in params if p)
    attrs = list(own_attrs.values()) + [v for k, v in ATTRIBUTES.items() if k not in own_attrs
                                        and k not in getattr(cls, "_doc_skip_attributes", ())]
    built = dict(sections)
    built["Parameters"] = params_body
    built["Attributes"] = "\n".join(attrs)
    order = [t for t in _ORDER if t in built] + [t for t in titles if t not in _ORDER]
    text = intro.rstrip() + "\n\n" + "\n\n".join(
        f"{t}\n{'-' * len(t)}\n{built[t]}" for t in order) + "\n"
    _SOURCES[f"{cls.__module__}.{cls.__qualname__}"] = text
    cls.__doc__ = terminal_text(text)
    return cls


def composed_source(path: str) -> str | None:
    """The composed docstring (reStructuredText with TeX) of the class ``module.qualname``, or
    None when it is not composed. Imports the module."""
    module, _, name = path.rpartition(".")
    try:
        importlib.import_module(module)
    except ImportError:
        return None
    return _SOURCES.get(path)


def documented_parameters(cls) -> set[str]:
    """Names in the Parameters section of ``cls``'s (composed) docstring."""
    import inspect

    doc = _SOURCES.get(f"{cls.__module__}.{cls.__qualname__}") or inspect.getdoc(cls) or ""
    return set(_entries(dict(_sections(doc)[1]).get("Parameters", "")))


# -- TeX to Unicode -----------------------------------------------------------------------------

_SYMBOLS = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "varepsilon": "ε",
    "zeta": "ζ", "eta": "η", "theta": "θ", "vartheta": "ϑ", "iota": "ι", "kappa": "κ",
    "lambda": "λ", "mu": "μ", "nu": "ν", "xi": "ξ", "pi": "π", "rho": "ρ", "sigma": "σ",
    "tau": "τ", "upsilon": "υ", "phi": "ϕ", "varphi": "φ", "chi": "χ", "psi": "ψ",
    "omega": "ω", "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Xi": "Ξ",
    "Pi": "Π", "Sigma": "Σ", "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω", "ell": "ℓ",
    "sum": "Σ", "prod": "∏", "int": "∫", "nabla": "∇", "partial": "∂", "infty": "∞",
    "le": "≤", "leq": "≤", "ge": "≥", "geq": "≥", "ne": "≠", "neq": "≠", "approx": "≈",
    "sim": "~", "simeq": "≃", "equiv": "≡", "propto": "∝", "in": "∈", "notin": "∉",
    "subset": "⊂", "subseteq": "⊆", "cup": "∪", "cap": "∩", "setminus": "∖",
    "to": "→", "rightarrow": "→", "leftarrow": "←", "mapsto": "↦", "Rightarrow": "⇒",
    "times": "×", "cdot": "·", "cdots": "⋯", "ldots": "…", "dots": "…", "otimes": "⊗",
    "odot": "⊙", "oplus": "⊕", "circ": "∘", "pm": "±", "mp": "∓", "mid": "|", "vert": "|",
    "Vert": "‖", "|": "‖", "lVert": "‖", "rVert": "‖", "langle": "⟨", "rangle": "⟩",
    "top": "ᵀ", "dagger": "†", "star": "⋆", "ast": "∗", "forall": "∀", "exists": "∃",
    "lfloor": "⌊", "rfloor": "⌋", "lceil": "⌈", "rceil": "⌉", "{": "{", "}": "}",
    "%": "%", "_": "_", "&": "&", "#": "#", "$": "$",
    "log": "log", "exp": "exp", "max": "max", "min": "min", "det": "det", "tr": "tr",
    "arg": "arg", "sup": "sup", "inf": "inf", "lim": "lim", "sin": "sin", "cos": "cos",
    "tanh": "tanh", "diag": "diag", "operatorname": "", "displaystyle": "", "textstyle": "",
    ",": " ", ";": " ", ":": " ", "!": "", " ": " ", "quad": "  ", "qquad": "    ",
    "left": "", "right": "", "big": "", "Big": "", "bigg": "", "Bigg": "", "bigl": "",
    "bigr": "", "Bigl": "", "Bigr": "", "limits": "", "nolimits": "",
}
_TEXT_MACROS = {"mathrm", "text", "texttt", "textrm", "mathit", "mathbf", "boldsymbol",
                "mathsf", "textbf", "textit", "operatorname", "bm", "mbox"}
_BLACKBOARD = {"R": "ℝ", "N": "ℕ", "Z": "ℤ", "Q": "ℚ", "C": "ℂ", "E": "𝔼", "P": "ℙ"}
_CALLIGRAPHIC = {"N": "𝒩", "L": "ℒ", "O": "𝒪", "D": "𝒟", "H": "ℋ", "F": "ℱ", "X": "𝒳",
                 "Y": "𝒴"}
_ACCENTS = {"hat": "\u0302", "widehat": "\u0302", "tilde": "\u0303", "widetilde": "\u0303",
            "bar": "\u0304", "overline": "\u0304", "vec": "\u20d7", "dot": "\u0307"}
_SUP = dict(zip("0123456789+-=()niTtkx", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱᵀᵗᵏˣ"))
_SUB = dict(zip("0123456789+-=()aehijklmnoprstuvxβγρφχ", "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎ₐₑₕᵢⱼₖₗₘₙₒₚᵣₛₜᵤᵥₓᵦᵧᵨᵩᵪ"))
_SUP["/"] = "ᐟ"


class _TeX:
    """A small recursive reader of the TeX subset the docstrings use."""

    def __init__(self, s: str):
        self.s, self.i = s, 0

    def group(self) -> str:
        """The next argument: a {...} group, a control sequence, or one character."""
        s = self.s
        while self.i < len(s) and s[self.i] == " ":
            self.i += 1
        if self.i >= len(s):
            return ""
        if s[self.i] == "{":
            depth, j = 0, self.i
            while j < len(s):
                depth += {"{": 1, "}": -1}.get(s[j], 0)
                if depth == 0:
                    break
                j += 1
            inner, self.i = s[self.i + 1:j], j + 1
            return _TeX(inner).run()
        if s[self.i] == "\\":
            return self.command()
        self.i += 1
        return s[self.i - 1]

    def raw_group(self) -> str:
        s = self.s
        while self.i < len(s) and s[self.i] == " ":
            self.i += 1
        if self.i < len(s) and s[self.i] == "{":
            j = s.index("}", self.i)
            out, self.i = s[self.i + 1:j], j + 1
            return out
        self.i += 1
        return s[self.i - 1:self.i]

    def command(self) -> str:
        s = self.s
        m = re.compile(r"\\([A-Za-z]+|.)").match(s, self.i)
        self.i = m.end()
        name = m.group(1)
        if name in _TEXT_MACROS:
            return self.group()
        if name in ("mathbb", "mathcal"):
            arg = self.raw_group().strip()
            table = _BLACKBOARD if name == "mathbb" else _CALLIGRAPHIC
            return table.get(arg, arg)
        if name in ("frac", "tfrac", "dfrac"):
            a, b = self.group(), self.group()
            gap = " " if self.i < len(s) and (s[self.i] == "\\" or s[self.i].isalnum()) else ""
            return f"{_paren(a)}/{_paren(b)}{gap}"
        if name == "sqrt":
            a = self.group()
            return "√" + _paren(a)
        if name in _ACCENTS:
            a = self.group()
            return a[:1] + _ACCENTS[name] + a[1:] if a else ""
        if name in _SYMBOLS:
            out = _SYMBOLS[name]
            # a word-like symbol runs into a following letter: "\log x" -> "log x"
            if out.isalpha() and len(out) > 1 and self.i < len(s) and s[self.i] == " ":
                out += " "
            return out
        return name

    def run(self) -> str:
        out = []
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == "\\":
                out.append(self.command())
            elif c in "^_":
                self.i += 1
                arg = self.group()
                out.append(_script(arg, _SUP if c == "^" else _SUB, c))
            elif c == "{":
                out.append(self.group())
            elif c == "}":
                self.i += 1
            elif c == "~":
                self.i += 1
                out.append(" ")
            else:
                self.i += 1
                out.append(c)
        return "".join(out)


def _paren(a: str) -> str:
    a = a.strip()
    atom = r"[\w.ᵀ⁻¹²ᐟ\u0300-\u036f]+"
    return a if re.fullmatch(rf"{atom}(\([^()]*\))?|\(.*\)", a) else f"({a})"


def _script(arg: str, table: dict, mark: str) -> str:
    if arg == "ᵀ":
        return "ᵀ"
    if arg and all(ch in table for ch in arg) and not (len(arg) > 2 and arg.isalpha()):
        return "".join(table[ch] for ch in arg)  # a word ("train") stays legible: _train
    return f"{mark}{arg}" if len(arg) == 1 or arg.isalnum() else f"{mark}({arg})"


def tex_to_text(tex: str) -> str:
    """A TeX formula as plain text with Unicode symbols, for a terminal.

    >>> tex_to_text(r"\\mathrm{Tr}\\,F(F+\\Lambda)^{-1}")
    'Tr F(F+Λ)⁻¹'
    >>> tex_to_text(r"\\frac1n\\sum_i g_i^\\top g_i")
    '1/n Σᵢ gᵢᵀ gᵢ'
    """
    out = _TeX(tex).run()
    return re.sub(r" {2,}", " ", out).strip() if "  " not in tex else out.strip()


# -- reStructuredText to plain text -------------------------------------------------------------

_ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|exc|obj|ref|doc|term):`~?([^`<]*?)"
                   r"(?:\s*<[^`]*>)?`")
_TILDE = re.compile(r":(?:class|func|mod|meth|attr|data|exc|obj):`~([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^([ \t]*)\.\. math::[ \t]*(.*)\n((?:(?:\1[ \t]+.*)?\n)*)", re.M)


def terminal_text(doc: str | None) -> str | None:
    """``doc`` with its reStructuredText markup (``:math:`` roles, ``.. math::`` blocks,
    ``:class:``-style roles) rewritten as plain text with Unicode formulas."""
    if not doc or (":" not in doc and ".. math" not in doc):
        return doc

    def block(m):
        indent = m.group(1)
        body = (m.group(2) + "\n" + textwrap_dedent(m.group(3))).strip()
        parts = re.split(r"\\\\\n?|\n\s*\n", body)
        lines = [tex_to_text(" ".join(part.split())) for part in parts if part.strip()]
        return "".join(f"{indent}    {line}\n" for line in lines) + "\n"

    doc = _MATH_BLOCK.sub(block, doc)
    doc = _MATH_ROLE.sub(lambda m: tex_to_text(m.group(1)), doc)
    doc = _TILDE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], doc)
    return _ROLE.sub(lambda m: m.group(1), doc)


def textwrap_dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text)


# -- applying it to every softrank module -------------------------------------------------------

def _rewrite(obj, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    try:
        doc = obj.__doc__
        new = terminal_text(doc)
        if new is not doc:
            obj.__doc__ = new
    except (AttributeError, TypeError):
        return
    if isinstance(obj, type):
        for member in vars(obj).values():
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, (types.FunctionType, property)) or (
                    isinstance(member, type) and member.__module__ == obj.__module__):
                _rewrite(member, seen)


def rewrite_module(module) -> None:
    """Rewrite (:func:`terminal_text`) the docstrings of ``module`` and of the functions,
    classes, methods and properties it defines."""
    seen: set = set()
    _rewrite(module, seen)
    for value in list(vars(module).values()):
        if isinstance(value, (types.FunctionType, type)) and \
                getattr(value, "__module__", None) == module.__name__:
            _rewrite(value, seen)


class _Loader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        rewrite_module(module)

    def __getattr__(self, name):  # get_source, get_code... for inspect and doctest
        return getattr(self.loader, name)


class _Finder:
    def find_spec(self, name, path, target=None):
        if not name.startswith("softrank.") or name.startswith("softrank._doc"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Rewrite the docstrings of the softrank modules imported so far, and of every one
    imported later (a finder on :data:`sys.meta_path` that only handles ``softrank.*``)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name, module in list(sys.modules.items()):
        if (name == "softrank" or name.startswith("softrank.")) and module is not None \
                and name != "softrank._doc":
            rewrite_module(module)
