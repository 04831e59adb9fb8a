"""llb-edge: LLB-purified Dinomaly anomaly inspection, from training to the PLC.

Importing this package stays light (no torch): the line side imports ``llb_edge.runtime`` only.
"""

__version__ = "0.1.0"
