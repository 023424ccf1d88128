#!/usr/bin/env bash
# Two parley clients pair and chat through a relay with no human and no sleeps: everything
# waits on the events the programs print (--json). Needs parley and parley-relay on PATH.
set -euo pipefail

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
mkfifo "$work/relay.out" "$work/alice.in" "$work/alice.out"

# 1. A relay on a free port. Its first line on stdout says where it listens.
parley-relay --listen 127.0.0.1:0 > "$work/relay.out" 2> "$work/relay.log" &
read -r _ _ url < "$work/relay.out"              # "listening on ws://127.0.0.1:PORT"
export PARLEY_RELAY="$url" PARLEY_STATE_DIR="$work/state"

# 2. Alice hosts. Her first event is the invite; read the code from it.
parley --name alice --json --exit-after 1 host < "$work/alice.in" > "$work/alice.out" &
alice=$!
exec 3> "$work/alice.in" 4< "$work/alice.out"
read -r invite <&4
code=$(printf '%s\n' "$invite" | sed -n 's/.*"code":"\([0-9]*-[0-9]*\)".*/\1/p')
echo "invite code: $code"

# 3. Bob joins with the code, sends one line, and stays until he has received one message.
echo "hi alice, bob here" | parley --name bob --json --exit-after 1 join "$code" > "$work/bob.out" &
bob=$!

# 4. Alice sends one line and ends her input. Each exits 0 once it has received one message
#    and the relay has taken everything it typed.
echo "hello bob" >&3
exec 3>&-
cat <&4 > "$work/alice.rest"
wait "$alice" "$bob"

echo "alice received: $(grep '"event":"message"' "$work/alice.rest" | sed -n 's/.*"text":"\([^"]*\)".*/\1/p')"
echo "bob received:   $(grep '"event":"message"' "$work/bob.out" | sed -n 's/.*"text":"\([^"]*\)".*/\1/p')"
