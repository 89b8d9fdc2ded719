"""Blind RSTs against a real TCP connection through the lab (issue #14, finding 5).

A client and a server hold an echo connection across the chain; the client
host sends crafted RSTs into it (`dataplane.lab.packets.send`). A RST whose
sequence number is in the window but not the server's next expected byte
is dropped by the firewall (`rst_challenge`), one far outside too
(`rst_out_of_window`), and the connection carries on; the control, the same
RST at the exact sequence number, passes and the server resets the
connection.
"""

from __future__ import annotations

import subprocess
import sys
import time

from scapy.layers.inet import IP, TCP

from dataplane.lab.packets import send

PORT, LOCAL = 9100, 46000

ECHO = """
import socket, sys, threading
def serve(c):
    while True:
        d = c.recv(4096)
        if not d:
            return
        c.sendall(d)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

CLIENT = """
import socket, sys
c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(("0.0.0.0", int(sys.argv[3]))); c.connect((sys.argv[1], int(sys.argv[2]))); c.settimeout(3)
print("connected", flush=True)
for line in sys.stdin:
    try:
        c.sendall(line.encode())
        got = c.recv(4096)
        print("ok" if got == line.encode() else f"dead: {got!r}", flush=True)
    except OSError as exc:
        print(f"dead: {exc}", flush=True)
"""


def say(client: subprocess.Popen, text: str) -> str:
    client.stdin.write(text + "\n")
    client.stdin.flush()
    return client.stdout.readline().strip()


def firewall_flow(lab, inst: str) -> dict:
    code = lab.topo.stream_code(LOCAL, PORT)
    rows = [f for f in lab.flows(inst) if f["code"] == f"0x{code:08x}" and f["proto"] == 6
            and f["role"] == "primary"]
    assert len(rows) == 1, rows
    return rows[0]["state"]


def rst(lab, seq: int) -> None:
    c, s = lab.topo.hosts["client"].address.ip, lab.topo.hosts["server"].address.ip
    send(lab.topo, "client", [IP(src=str(c), dst=str(s)) / TCP(sport=LOCAL, dport=PORT, flags="R",
                                                                seq=seq % (1 << 32), window=0)])


def test_a_blind_rst_does_not_close_a_real_connection_the_exact_one_does(lab):
    (lab.tmp / "echo.py").write_text(ECHO)
    (lab.tmp / "client.py").write_text(CLIENT)
    server_ip = str(lab.topo.hosts["server"].address.ip)
    lab.spawn("server", [sys.executable, str(lab.tmp / "echo.py"), server_ip, str(PORT)],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not lab._listening(PORT) and time.monotonic() < deadline:
        time.sleep(0.05)
    client = lab.spawn("client", [sys.executable, str(lab.tmp / "client.py"), server_ip, str(PORT), str(LOCAL)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert client.stdout.readline().strip() == "connected"
    assert say(client, "hello") == "ok"
    inst = lab.map().primary("B", lab.topo.stream_code(LOCAL, PORT))
    time.sleep(0.3)                                           # the client's delayed ACK has gone by
    st = firewall_flow(lab, inst)
    assert st["state"] in ("ESTABLISHED", 3) and st["orig_forward"]
    nxt = st["end0"]                                          # the server's next expected byte
    drops = lab.ask(inst, "status")["drops"]

    rst(lab, nxt + 3000)                                      # blind, inside the window
    rst(lab, nxt + (1 << 31))                                 # blind, far outside
    time.sleep(0.3)
    after = lab.ask(inst, "status")["drops"]
    assert after.get("rst_challenge", 0) == drops.get("rst_challenge", 0) + 1
    assert after.get("rst_out_of_window", 0) == drops.get("rst_out_of_window", 0) + 1
    assert say(client, "still there") == "ok"
    assert firewall_flow(lab, inst)["state"] in ("ESTABLISHED", 3)

    time.sleep(0.3)
    rst(lab, firewall_flow(lab, inst)["end0"])                # control: the exact sequence number
    time.sleep(0.3)
    assert firewall_flow(lab, inst)["state"] in ("CLOSED", 7)
    assert say(client, "gone?").startswith("dead")
    client.stdin.close()
