"""Bearer-token authentication of a gRPC server (the token itself: serving/auth.py)."""

from __future__ import annotations

import hmac

import grpc

OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # never behind the token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Calls must carry ``authorization: Bearer <token>``; health checks and reflection need none."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

        self.refusal = refuse

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self.expected.encode()):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return grpc.unary_unary_rpc_method_handler(
            self.refusal, request_deserializer=handler.request_deserializer if handler else None,
            response_serializer=handler.response_serializer if handler else None)
