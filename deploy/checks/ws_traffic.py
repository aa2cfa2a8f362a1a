#!/usr/bin/env python3
"""Drives a little traffic through a running gateway so that its labelled metrics have series:
a refused handshake, two accepted ones, a message with its ack and delivery, an `error` frame for
a bad frame and one for a binary frame, and two client closes.

Usage: ws_traffic.py http://127.0.0.1:8080   (the gateway's public address; standard library only)
Used by deploy/check-prometheus-scrape.sh. Exits 1 with a one-line reason when a step fails.
"""

import base64
import json
import os
import socket
import struct
import sys
import urllib.request
from urllib.parse import urlsplit

TIMEOUT = 10


def register(base, name):
    email = f"{name}-{os.getpid()}-{os.urandom(4).hex()}@scrape.example.com"
    body = json.dumps({"name": name, "email": email, "password": "scrape-password"}).encode()
    req = urllib.request.Request(base + "/api/v1/auth/register", body,
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        doc = json.load(r)
    return doc["user"]["id"], doc["token"]


class WebSocket:
    """The client side of RFC 6455, just enough for text, binary and close frames."""

    def __init__(self, host, port, token):
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n{auth}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1]) if head else 0

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = struct.pack("!B", 0x80 | opcode)
        if n < 126:
            head += struct.pack("!B", 0x80 | n)
        else:
            head += struct.pack("!BH", 0x80 | 126, n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self):
        """The next text or close frame as (opcode, payload); answers pings on the way."""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self.send(0xA, payload)
            elif opcode in (0x1, 0x8):
                return opcode, payload

    def recv_json(self, want):
        opcode, payload = self.recv()
        frame = json.loads(payload) if opcode == 0x1 else {"type": "close"}
        if frame.get("type") != want:
            raise RuntimeError(f"expected a {want} frame, got {payload[:200]!r}")
        return frame

    def close(self):
        self.send(0x8, struct.pack("!H", 1000))
        try:
            while self.recv()[0] != 0x8:
                pass
        except (ConnectionError, OSError):
            pass
        self.sock.close()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    base = sys.argv[1].rstrip("/")
    url = urlsplit(base)
    host, port = url.hostname, url.port or 80
    try:
        alice, alice_token = register(base, "scrape-alice")
        bob, bob_token = register(base, "scrape-bob")

        refused = WebSocket(host, port, "not-a-token")
        refused.sock.close()
        if refused.status != 401:
            raise RuntimeError(f"a bad token got HTTP {refused.status}, expected 401")

        a, b = WebSocket(host, port, alice_token), WebSocket(host, port, bob_token)
        for ws in (a, b):
            if ws.status != 101:
                raise RuntimeError(f"handshake got HTTP {ws.status}, expected 101")
            ws.recv_json("hello")

        a.send(0x1, json.dumps({"type": "send", "id": "s1", "to": bob, "body": "scrape"}).encode())
        a.recv_json("ack")
        b.recv_json("message")
        a.send(0x1, b'{"type":"nope","id":"s2"}')
        a.recv_json("error")
        a.send(0x2, b"\x00")
        a.recv_json("error")
        a.close()
        b.close()
    except Exception as e:  # one line for the calling script
        sys.exit(f"ws_traffic: {type(e).__name__}: {e}")
    print(f"ws_traffic: 1 refused and 2 accepted handshakes, 1 message, 2 errors, 2 closes ({alice} -> {bob})")


if __name__ == "__main__":
    main()
