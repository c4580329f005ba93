#!/usr/bin/env python3
"""Fibonacci RPC client in the style of RabbitMQ tutorial 6, with pika 1.x.

Publishes n to the request queue with reply_to (an exclusive, server-named callback queue) and a
fresh correlation_id, waits for the matching reply and prints the result alone on stdout.
Replies with another correlation_id are ignored. Exits 1 if no reply came within --timeout.
"""
import argparse
import sys
import time
import uuid

import pika

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


class FibonacciRpcClient:
    def __init__(self, url):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue
        self.channel.basic_consume(
            queue=self.callback_queue,
            on_message_callback=self.on_response,
            auto_ack=True,
        )
        self.response = None
        self.corr_id = None

    def on_response(self, ch, method, props, body):
        if props.correlation_id == self.corr_id:
            self.response = body

    def call(self, n, queue, timeout):
        """Returns the reply body, or None if none came within `timeout` seconds."""
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="",
            routing_key=queue,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=self.corr_id,
            ),
            body=str(n),
        )
        deadline = time.monotonic() + timeout
        while self.response is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.connection.process_data_events(time_limit=min(remaining, 0.5))
        return self.response

    def close(self):
        self.connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int)
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--queue", default="rpc_queue")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    client = FibonacciRpcClient(args.url)
    try:
        response = client.call(args.n, args.queue, args.timeout)
    finally:
        client.close()
    if response is None:
        print(f"no reply within {args.timeout}s", file=sys.stderr)
        return 1
    print(response.decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
