"""chainrule.server: the gRPC service, its configuration and the command line."""
from .app import Servicer, create_running_server, create_server
from .config import ServerConfig
from .service import ChainruleService

__all__ = ["ChainruleService", "Servicer", "ServerConfig", "create_running_server", "create_server"]
