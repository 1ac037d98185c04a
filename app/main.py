"""The workbench app: `streamlit run app/main.py`. One module per page under app/views/."""

import importlib
import sys
import threading
from pathlib import Path

import streamlit as st

# `streamlit run app/main.py` puts app/ on the path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

st.set_page_config(page_title="In-context regression workbench", layout="wide")
VIEWS = Path(__file__).parent / "views"
PAGES = [("runs", "Runs", True), ("prompt", "Prompt", False), ("leaderboard", "Leaderboard", False),
         ("logit_diff", "Logit difference by layer", False), ("attention", "Attention", False),
         ("mlp", "MLP", False), ("probes", "Probes", False),
         ("interventions", "Interventions", False), ("sweep", "Attribution sweep", False),
         ("mechanism", "Mechanism", False)]
st.navigation([st.Page(VIEWS / f"{name}.py", title=title, url_path=name.replace("_", "-"), default=default)
               for name, title, default in PAGES]).run()

if "circuitsvis" not in sys.modules:
    # The Attention page's CircuitsVis imports torch (1.6 s here): load it in the
    # background once the first page is drawn, while the reviewer reads it.
    threading.Thread(target=importlib.import_module, args=("circuitsvis",), daemon=True).start()
