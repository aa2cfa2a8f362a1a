# Writes N EVALSHA calls of the append script (loadtest/append-script-cost.sh) in RESP, shaped
# like the gateway's (chat-core/src/log/redis.rs): 500 conversations over 8 partition streams, a 64-byte body, a fresh client id
# each, the envelope header around the seq, two channels.
# The conversations' counters and the partitions' epochs must exist first (the script refuses
# to issue a seq otherwise): `append_cost_gen.py setup` writes them.
# Usage: append_cost_gen.py setup > file; append_cost_gen.py N SHA > file
import random
import sys
import uuid
def resp(*args):
    out = [f"*{len(args)}\r\n"]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(f"${len(b)}\r\n")
        out.append(b.decode('latin1') + "\r\n")
    return "".join(out)
rng = random.Random(42)
convs = [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(500)]
w = sys.stdout
if sys.argv[1] == "setup":
    for p in range(8):
        w.write(resp("SET", f"lt:epoch:{p}", "tok:0"))
    for c in convs:
        w.write(resp("HSET", f"lt:{{{c}}}:ctr", "n", 0, "e", "tok:0"))
    sys.exit(0)
n, sha = int(sys.argv[1]), sys.argv[2]
body = "x" * 64
for i in range(n):
    c = convs[i % 500]
    p = convs.index(c) % 8
    keys = [f"lt:{{{c}}}:ctr", f"lt:stream:{p}", f"lt:{{{c}}}:tail", f"lt:{{{c}}}:pair", f"lt:{{{c}}}:dedup:{i}", f"lt:epoch:{p}"]
    msg = str(uuid.uuid4())
    frame_a = '{"type":"message","msg_id":"%s","conversation_id":"%s","seq":' % (msg, c)
    frame_b = ',"from":"%s","to":"%s","body":"%s","ts":1795397327000}' % (c, c, body)
    header_a = "m %s %s 1795397327000 " % (uuid.uuid4(), c)
    args = [msg, c, c, c, body, "1795397327000", frame_a, frame_b, header_a, "", "1000", "604800000", "600000", "a:b", "", "1000000000", "524288", f"lt:ch:{c}:a", f"lt:ch:{c}:b"]
    w.write(resp("EVALSHA", sha, 6, *keys, *args))
