"""harness: fine-tune and evaluate Stable Diffusion 1.5 checkpoints.

Stages live in sub-packages and data flows one way:
data -> caption -> train -> generate -> metrics -> report. No stage imports a later one.
"""

__version__ = "0.1.0"
