"""Widgets whose values live in the URL: a link, or a reopened experiment, sets their keys,
and each widget restarts from its key (`param`) and writes it back (`set_param`)."""

import streamlit as st

from app.common import choose, param, set_param
from core.candidates import TRUTH
from core.store import MODEL_COLUMN, RunStore


def radio(label: str, key: str, options: list[str], default: str, **kw) -> str:
    wanted = param(key)
    index = options.index(wanted) if wanted in options else options.index(default)
    value = st.radio(label, options, index=index, key=f"w:{key}", horizontal=True, **kw)
    set_param(key, value)
    return value


def check(label: str, key: str, default: bool, **kw) -> bool:
    wanted = param(key)
    value = st.checkbox(label, value=wanted == "1" if wanted in ("0", "1") else default, key=f"w:{key}", **kw)
    set_param(key, "1" if value else "0")
    return value


def many(label: str, key: str, options: list, default: list, **kw) -> list:
    """A multiselect; values the options no longer hold (another run, another site kind) are dropped."""
    names = [str(o) for o in options]
    state = st.session_state.get(f"w:{key}")
    if state is not None and any(str(v) not in names for v in state):
        st.session_state.pop(f"w:{key}")
    wanted = param(key)
    start = default if wanted is None else [options[names.index(n)] for n in wanted.split(",") if n in names]
    value = st.multiselect(label, options, default=start, key=f"w:{key}", **kw)
    set_param(key, ",".join(map(str, value)))
    return value


def integer(label: str, key: str, default: int, lo: int, hi: int, **kw) -> int:
    state = st.session_state.get(f"w:{key}")
    if state is not None and not lo <= state <= hi:
        st.session_state.pop(f"w:{key}")
    try:
        start = int(param(key, str(default)))
    except ValueError:
        start = default
    value = st.number_input(label, lo, hi, value=min(max(start, lo), hi), step=1, key=f"w:{key}", **kw)
    set_param(key, int(value))
    return int(value)


def text(label: str, key: str, default: str, **kw) -> str:
    value = st.text_input(label, value=param(key, default), key=f"w:{key}", **kw)
    set_param(key, value)
    return value


def number(label: str, key: str, default: float, **kw) -> float:
    try:
        start = float(param(key, str(default)))
    except ValueError:
        start = default
    value = st.number_input(label, value=start, key=f"w:{key}", **kw)
    set_param(key, value)
    return float(value)


def candidate_pair(store: RunStore) -> tuple[str, str]:
    """Candidates A and B side by side (the truth, the model's answer, the run's regressors)."""
    candidates = [TRUTH, MODEL_COLUMN] + [c for c in store.columns if c != MODEL_COLUMN]
    ca, cb = st.columns(2)
    with ca:
        a = choose("Candidate A", "a", candidates, default=TRUTH, sidebar=False)
    with cb:
        b = choose("Candidate B", "b", candidates, default=MODEL_COLUMN, sidebar=False)
    return a, b


def unusable(seeds: list, pair: tuple[str, str]) -> bool:
    """Shows why seeds and a pair of candidates cannot run, and returns True, if they cannot."""
    if not seeds:
        st.warning("Choose at least one seed.")
    elif pair[0] == pair[1]:
        st.warning("A and B are the same candidate: their difference is zero. Choose two.")
    return not seeds or pair[0] == pair[1]
