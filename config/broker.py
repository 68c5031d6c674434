"""kombu's Redis transport with one redis-py client per channel instead of one per command.

kombu 5.7's Redis channel builds a new `redis.Redis` for every command it sends outside the
worker's event loop (`Channel.conn_or_acquire` -> `_create_client`): each message's receipt
(`QoS.append`), each ack, each publish. Building a redis-py 8 client costs ~65 us here (it copies
a table of ~200 response callbacks), and it was 11% of the Celery workers' samples in
`make bench`'s profile. A `redis.Redis` may be shared between threads (every command takes a
connection from the pool and gives it back); pipelines may not, and kombu still makes one per
use. The shared client is dropped with the pool it was made for (kombu replaces the pool after a
fork or a connection error).

Used for `redis://` brokers only (settings.CELERY_BROKER_TRANSPORT): for `rediss://` kombu
derives the TLS defaults from the transport's name, so that keeps kombu's own transport.
"""

from typing import Any

from kombu.transport import redis as kombu_redis

# kombu's stubs leave out the channel's private methods overridden here.
_Channel: Any = kombu_redis.Channel


class RedisChannel(_Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            # The event loop's own clients (BRPOP): kombu keeps those itself.
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            # Two threads may both get here at first: each makes one, the last one is kept.
            client = super()._create_client()
            self._shared_client = client
        return client


class RedisTransport(kombu_redis.Transport):
    Channel = RedisChannel
