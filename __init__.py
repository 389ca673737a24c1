"""The installed package (`pip install .` or `pip install -e .`): `import radjepa` from any folder is the
method, radjepa.py; the other rooms are its submodules (radjepa.eval, radjepa.data_prep, radjepa.plumbing,
radjepa.kernels). In a clone this file is never imported: `import radjepa` from the repository root is
radjepa.py itself, and `python radjepa.py`, `python eval.py`, `python data_prep.py` run as scripts."""
from .radjepa import *  # noqa: F401,F403
from .radjepa import __doc__  # noqa: F401
