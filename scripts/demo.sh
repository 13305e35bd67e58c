#!/usr/bin/env bash
# A first run of cssfs on a fresh Debian machine: installs what it needs (scripts/bootstrap.sh),
# then shows the main job with two people, alice and bob, each with their own identity in a
# throw-away directory -- your own identity (~/.config/cssfs) is never touched.
#
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

bash scripts/bootstrap.sh
cssfs=$repo/.venv/bin/cssfs

demo=$(mktemp -d "${TMPDIR:-/tmp}/cssfs-demo.XXXXXX")
trap 'rm -rf "$demo"' EXIT

step() { printf '\n== %s\n' "$*"; }
# as NAME CMD...: run CMD as that person (their own XDG config dir: identity and contacts).
as() {
    local who=$1
    shift
    XDG_CONFIG_HOME=$demo/$who/config XDG_STATE_HOME=$demo/$who/state "$@"
}

step "alice and bob each make an identity (cssfs keygen)"
alice=$(as alice "$cssfs" keygen --no-passphrase | head -n 1)
bob=$(as bob "$cssfs" keygen --no-passphrase | head -n 1)
echo "alice: $alice"
echo "bob:   $bob"

step "they add each other as contacts (recipient strings travel over chat; fingerprints are compared by phone)"
as alice "$cssfs" contacts add bob "$bob"
as bob "$cssfs" contacts add alice "$alice"
as alice "$cssfs" contacts list

step "alice encrypts a file for bob (she is a recipient too, automatically)"
sample=$demo/sample.txt
{ echo "Quarterly numbers, for bob's eyes only."; head -c 200000 /dev/urandom | base64; } >"$sample"
as alice "$cssfs" encrypt -r bob "$sample" "$demo/sample.txt.enc"
ls -l "$sample" "$demo/sample.txt.enc"
as bob "$cssfs" inspect "$demo/sample.txt.enc"

step "bob decrypts it with his own identity"
as bob "$cssfs" decrypt "$demo/sample.txt.enc" "$demo/sample.bob.txt"
cmp "$sample" "$demo/sample.bob.txt"
echo "bob's copy is identical to alice's file"

step "a third person cannot read it"
as carol "$cssfs" keygen --no-passphrase >/dev/null
if as carol "$cssfs" decrypt "$demo/sample.txt.enc" "$demo/sample.carol.txt" 2>"$demo/carol.err"; then
    echo "demo: carol should not have been able to decrypt" >&2
    exit 1
fi
echo "carol gets (as expected): $(cat "$demo/carol.err")"
test ! -e "$demo/sample.carol.txt"

step "alice mounts a local folder as her encrypted store (cssfs mount), copies a file in, reads it back"
store=$demo/store
mnt=$demo/mnt
mkdir -p "$store" "$mnt"
trap 'fusermount3 -u -z "$mnt" 2>/dev/null || true; rm -rf "$demo"' EXIT
as alice "$cssfs" mount "$store" "$mnt"
cp "$sample" "$mnt/sample.txt"
cmp "$sample" "$mnt/sample.txt"
ls -l "$mnt"
as alice "$cssfs" umount "$mnt"
echo "unmounted; the store folder holds only ciphertext:"
ls -l "$store"
if grep -rqF "Quarterly numbers" "$store"; then
    echo "demo: plaintext found in the store folder" >&2
    exit 1
fi
as alice "$cssfs" mount "$store" "$mnt"
cmp "$sample" "$mnt/sample.txt"
echo "mounted again: the file reads back identical"
as alice "$cssfs" umount "$mnt"

printf '\ndemo: all steps passed\n'
