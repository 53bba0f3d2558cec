"""edgeward's shared layer: wire schemas (generated from the .proto files beside this package),
MQTT topics and session, and the command-line dispatcher.

The orchestrator and the node agent never import each other; both import only this package.
"""

__version__ = "0.1.0"
