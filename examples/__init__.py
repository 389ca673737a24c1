"""examples/: worked forks of radjepa.py, clone-only (not installed); run each from the repository root.

  lejepa.py   python examples/lejepa.py --data DIR --out OUT [--sigreg-lambda L] [--no-ema]
              I-JEPA masking + SIGReg (LeJEPA): SIGReg added to the EMA target, or instead of it
"""
