"""`llb-edge gateway`: daemon results to PLC tags over OPC UA and Modbus TCP (docs/gateway.md).

Importing this package needs only pyzmq; asyncua and pymodbus (the ``gateway`` extra) are
imported when an adapter of their kind is configured.
"""

from llb_edge.runtime.gateway.config import GatewayConfig, GatewayConfigError, load_config
from llb_edge.runtime.gateway.core import Gateway, GatewayCore
from llb_edge.runtime.gateway.run import GatewayThread, build_config, run_gateway

__all__ = [
    "Gateway",
    "GatewayConfig",
    "GatewayConfigError",
    "GatewayCore",
    "GatewayThread",
    "build_config",
    "load_config",
    "run_gateway",
]
