#!/usr/bin/env bash
# A first run of cssfs on a fresh Debian machine: installs what it needs (scripts/bootstrap.sh),
# then shows the main job with alice, bob and carol, each with their own identity in a
# throw-away directory -- your own identity (~/.config/cssfs) is never touched: encrypting a
# file for someone, mounting a store (here a local folder standing in for an S3 bucket), and
# sharing a folder of it so that bob reads alice's file through his own mount.
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
as alice "$cssfs" keygen --no-passphrase >/dev/null
as bob "$cssfs" keygen --no-passphrase >/dev/null
# `cssfs whoami` prints the recipient string (line 1) and the fingerprint (line 2).
alice=$(as alice "$cssfs" whoami | sed -n 1p)
bob=$(as bob "$cssfs" whoami | sed -n 1p)
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
bobmnt=$demo/bobmnt
mkdir -p "$store" "$mnt" "$bobmnt"
trap 'for m in "$mnt" "$bobmnt"; do fusermount3 -u -z "$m" 2>/dev/null || true; done; rm -rf "$demo"' EXIT
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

step "alice shares a folder with bob (cssfs share): files there are encrypted for both of them"
mkdir "$mnt/shared"
as alice "$cssfs" share "$mnt/shared" bob
echo "Meeting moved to 10:00. -- alice" >"$mnt/shared/note.txt"
as alice "$cssfs" sync "$mnt"   # returns once the file is in the store
as alice "$cssfs" access "$mnt/shared"

step "bob mounts the same store with his own identity and reads the file with plain cat"
as bob "$cssfs" mount "$store" "$bobmnt"
cat "$bobmnt/shared/note.txt"
echo "who wrote it and for whom (extended attributes):"
(cd "$bobmnt/shared" && getfattr -d -m user.cssfs note.txt)
ls -l "$bobmnt"
if cat "$bobmnt/sample.txt" >/dev/null 2>&1; then
    echo "demo: bob should not be able to open alice's private sample.txt" >&2
    exit 1
fi
echo "bob sees alice's private sample.txt listed, but opening it fails (Permission denied)"
as bob "$cssfs" umount "$bobmnt"
as alice "$cssfs" umount "$mnt"

printf '\ndemo: all steps passed\n'
