"""Run one of this repository's MONAI Deploy apps with the router's VLM answering from a script (tests only).

    python tests/scripted_app.py apps.route_execute_app -i IN -o OUT -m MODELS

The script is the JSON object in ``ONEVLM_TEST_SCRIPTED_ANSWERS`` (answer text -> probability), applied
to the router's calls on the specialty model's shared base (:func:`scripted_vlm.scripted_router_calls`).
Never shipped: the tests start it as a subprocess, as a site starts the app.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scripted_vlm import scripted_router_calls  # noqa: E402

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    with scripted_router_calls(json.loads(os.environ["ONEVLM_TEST_SCRIPTED_ANSWERS"])):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
