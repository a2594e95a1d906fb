"""chainrule.server: the service, served over gRPC or called in-process.

* ``service/``: what a call computes, free of gRPC and of any transport;
* ``servicer.py`` and ``grpc_server.py``: the gRPC server, only serving;
* ``local.py``: :class:`LocalClient`, the client API over the service in this process;
* ``cli/``: the ``chainrule`` command line.

    from chainrule.server import LocalClient, ServerConfig, create_server
"""
from .config import ServerConfig
from .grpc_server import ChainruleServer, build_service, create_server
from .local import LocalClient
from .service import ChainruleService

__all__ = ["ChainruleServer", "ChainruleService", "LocalClient", "ServerConfig", "build_service", "create_server"]
