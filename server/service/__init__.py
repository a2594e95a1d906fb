"""chainrule.server.service: what the server does, free of gRPC and of any transport.

Protobuf requests in, protobuf responses (or typed ChainruleErrors) out. The
gRPC servicer (``chainrule.server.servicer``) and the in-process
``LocalClient`` (``chainrule.server.local``) both call it, so both give the
same answers.
"""
from .optimize import optimize
from .service import ChainruleService, graph_id
from .streaming import evaluate_stream

__all__ = ["ChainruleService", "evaluate_stream", "graph_id", "optimize"]
