"""A language model as a mechanism-lab subject: edited tasks written as prompts of a run.

`LMSubject` writes each task in the run's prompt format (its template and number
format: two decimals, integer digits padded to the run's widths), and answers a
batch of edits of one seed with `core.interventions.executor.run_prompts`: an edit that
keeps the token count reuses the seed's clean KV cache up to its first changed token
and is patched from there; one that changes it (a dropped example, a wider number, an
added feature) gets a clean run of its own, started on the seed's KV cache at its first
token that differs, and is counted in `changed_length`. The base's own answer is the
answers' draft: an edited prompt's answer is read off it as far as it follows it, and
decoded from there.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from jaxtyping import Float, Int

from core.datasets import Sample
from core.generation import NumberGrammar
from core.interventions.executor import Clean, run_prompts, shared_prefix, whole_run
from core.models import LoadedModel
from core.mechanism.subjects import MechanismError, Task
from core.prompts import NumberFormat, int_digits, parse_number, prompt_text
from core.store import RunStore


READOUTS = ("greedy", "number")
NOISE_WORD = "Output"  # the examples' label, written in lower case by the noise-floor edit


def run_tasks(store: RunStore, rows: list[int]) -> list[Task]:
    """Returns the run's seeds at these store rows as tasks."""
    r = store.root
    x, y, q = r["x_train"][:], r["y_train"][:], r["x_query"][:]
    return [Task(x[i].astype(np.float64), y[i].astype(np.float64), q[i].astype(np.float64)) for i in rows]


def numbers(out: list[dict]) -> Float[np.ndarray, " m"]:
    """Returns the number of each `run_prompts` answer (NaN where it wrote none)."""
    return np.array([parse_number(o["decoded_text"]) for o in out], dtype=np.float64)


def task_format(fmt: NumberFormat, task: Task) -> NumberFormat:
    """Returns the run's format widened where the task needs more integer digits or has
    more columns (an added feature): the run's widths otherwise, so an edit that stays
    in range keeps every token position."""
    if fmt.kind != "aligned":
        return fmt
    cols = [*np.vstack([task.x, task.q]).T, task.y]
    need = [int_digits(c) for c in cols]
    run = fmt.int_digits  # features..., y
    widths = [max(need[j], run[j] if j < len(run) - 1 else 1) for j in range(len(cols) - 1)]
    return NumberFormat(fmt.kind, (*widths, max(need[-1], run[-1])))


def task_text(fmt: NumberFormat, task: Task) -> str:
    """Returns the task's prompt in a run's format (widened where the task needs it)."""
    return prompt_text(Sample(-1, task.x, task.y, task.q, float("nan")), task_format(fmt, task))


@dataclass
class LMSubject:
    """A loaded model answering the tasks of a run's seeds (`bases`: one task per seed)."""

    model: LoadedModel
    store: RunStore
    bases: list[Task]
    tokens: list[Int[np.ndarray, " T"]]  # each base's prompt as the run tokenized it
    name: str = ""
    readout: str = "greedy"  # or "number": greedy within the run's number format (`NumberGrammar`)
    changed_length: int = 0  # prompts of another length than their base's
    prompts_run: int = 0
    positions: int = 0  # prompt positions past each prompt's prefix shared with its base: what must be computed
    progress: Callable[[float, str], None] | None = None
    _fmt: NumberFormat = field(init=False)
    _grammars: dict[int, NumberGrammar] = field(init=False, default_factory=dict)
    _drafts: dict[int, list[int]] = field(init=False, default_factory=dict)
    _clean: tuple[int, Clean] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._fmt = self.store.number_format()
        if self.readout not in READOUTS:
            raise MechanismError(f"unknown readout {self.readout!r}; use one of {', '.join(READOUTS)}")
        if self.readout == "number" and self._fmt.kind != "aligned":
            raise MechanismError(f"the number readout needs a run in the aligned format; {self.store.name} is "
                                 f"{self._fmt.kind}")
        self.name = self.name or self.model.spec + ("" if self.readout == "greedy" else f"+{self.readout}")

    @classmethod
    def of_run(cls, model: LoadedModel, store: RunStore, rows: list[int] | None = None,
               name: str = "", readout: str = "greedy") -> "LMSubject":
        """Returns the subject over the run's seeds (store rows; default every finished one)."""
        rows = np.nonzero(store.done())[0].tolist() if rows is None else rows
        return cls(model, store, run_tasks(store, rows), [store.tokens(r) for r in rows], name, readout)

    def prompt(self, task: Task) -> Int[np.ndarray, " T"]:
        """Returns the task's prompt tokens in the run's format."""
        text = task_text(self._fmt, task)
        return np.asarray(self.model.tokenizer(text)["input_ids"], dtype=np.int64)

    def check_tokenizer(self) -> None:
        """Raises MechanismError unless the model writes the run's first prompt as the run's tokens."""
        if not np.array_equal(self.prompt(self.bases[0]), self.tokens[0]):
            raise MechanismError(f"{self.model.spec} tokenizes the prompts of run {self.store.name} differently "
                                 "from the model the run was built with; use a model with the same tokenizer")

    def predict(self, base: int, tasks: Sequence[Task]) -> Float[np.ndarray, " m"]:
        """Returns the model's greedy answer (as a number, NaN if none) to each task."""
        return numbers(self.run(base, [self.prompt(t) for t in tasks], [self.y_digits(t) for t in tasks]))

    def y_digits(self, task: Task) -> int:
        """Returns the integer digits the task's prompt gives the answer's column."""
        return task_format(self._fmt, task).int_digits[-1]

    def _grammar(self, int_digits: int) -> NumberGrammar | None:
        if self.readout == "greedy":
            return None
        if int_digits not in self._grammars:
            self._grammars[int_digits] = NumberGrammar(self.model, int_digits)
        return self._grammars[int_digits]

    def _max_new(self, y_digits: list[int]) -> int:
        # A number readout needs room for the widest answer its grammar allows, and its end.
        max_new = int(self.store.attrs["prompt"]["max_new_tokens"])
        return max(max_new, max(y_digits) + 5) if self.readout == "number" else max_new

    def clean(self, base: int) -> Clean:
        """Returns base `base`'s clean run (`whole_run`), kept until another base's is asked
        for: the lab runs every test of a seed before the next seed."""
        if self._clean is None or self._clean[0] != base:
            self._clean = None  # the last base's run goes before the next one is made
            self._clean = (base, whole_run(self.model, self.tokens[base]))
        return self._clean[1]

    def draft(self, base: int) -> list[int]:
        """Returns the tokens of base `base`'s own answer, which the answers to its edits
        mostly start with (`run_prompts` reads them off it as far as they follow it)."""
        if base not in self._drafts:
            digits = [self._fmt.int_digits[-1]]
            out = run_prompts(self.model, self.tokens[base], [self.tokens[base]], self._max_new(digits),
                              grammars=[self._grammar(d) for d in digits], clean=self.clean(base))
            self._drafts[base] = self.model.tokenizer.encode(out[0]["decoded_text"], add_special_tokens=False)
        return self._drafts[base]

    def run(self, base: int, prompts: list[Int[np.ndarray, " T"]], y_digits: list[int],
            answers: list[tuple[list[int], list[int]]] | None = None) -> list[dict]:
        """Returns `run_prompts` of prompts edited from base `base` (each with its answer
        column's integer digits) under the subject's readout, and counts them."""
        out = run_prompts(self.model, self.tokens[base], prompts, self._max_new(y_digits), answers=answers,
                          progress=self.progress, grammars=[self._grammar(d) for d in y_digits],
                          draft=None if answers else self.draft(base), clean=self.clean(base))
        self.prompts_run += len(prompts)
        self.positions += sum(len(p) - shared_prefix(p, self.tokens[base]) for p in prompts)
        self.changed_length += sum(not o["reused"] for o in out)
        return out

    def non_numeric_changes(self, base: int) -> Float[np.ndarray, " n"]:
        """Returns, per example i, how far the answer moves when example i's `Output` is
        written `output`: a non-numeric token, the token count kept (test 3's noise
        floor). NaN where the tokenizer does not write both words as one token each."""
        n = self.bases[base].n
        word, lower, colon = (self.model.tokenizer.encode(w, add_special_tokens=False)
                              for w in (NOISE_WORD, NOISE_WORD.lower(), ":"))
        tokens = self.tokens[base]
        at = [i for i in range(len(tokens) - 1) if [tokens[i]] == word and [tokens[i + 1]] == colon][:n]
        if len(word) != 1 or len(lower) != 1 or len(colon) != 1 or len(at) != n:
            return np.full(n, np.nan)
        prompts = [tokens] + [np.where(np.arange(len(tokens)) == i, lower[0], tokens) for i in at]
        a = numbers(self.run(base, prompts, [self._fmt.int_digits[-1]] * len(prompts)))
        return a[1:] - a[0]
