"""gRPC servicers: thin adapters from the API (proto/cpcoord/v1) to the engine modules.

They translate messages to calls and errors to statuses (cpcoord.grpcutil.rpc_errors);
the rules live in coordinator/engine.py and its helpers, never here.
"""

from coordinator.servicers.agent_control import AgentControl
from coordinator.servicers.coordinator_api import CoordinatorService

__all__ = ["AgentControl", "CoordinatorService"]
