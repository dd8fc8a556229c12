"""Who may write labels: the optional login's users and their password hashes.

Off unless configured. `python app.py` reads, in this order:

- `CMA_CLIP_USERS=/path/users.txt`: one user a line, `name:scrypt$<salt hex>$<hash hex>`
  (made by `python -m cma_clip.studio.accounts add users.txt NAME`, which asks the password);
- `CMA_CLIP_AUTH=name:password,name2:password2`: plain passwords in the environment (a
  Space's secrets, a test);
- `CMA_CLIP_LOGIN=huggingface`: Hugging Face OAuth on a Space (`hf_oauth: true` in the
  Space's README, and Gradio's OAuth extras: requirements-oauth.txt); the app shows Gradio's
  login button instead. Refused elsewhere: off a Space, Gradio's stand-in signs every visitor
  in as the owner of the machine's Hugging Face token.

When a login is on, the annotator of every decision is the signed-in user (app.py).
"""
from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import importlib.util
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CMAClipError
from ..labels import MAX_NAME_CHARS

SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # hashlib's scrypt at about 50 ms and 16 MB a check
SCRYPT_BYTES = 64  # the hash's length (hashlib.scrypt's default: hashes made before it was set are as long)
STORED_HASH = re.compile(rf"scrypt\$(?:[0-9a-fA-F]{{2}})+\$[0-9a-fA-F]{{{SCRYPT_BYTES * 2}}}")



class AccountsError(CMAClipError, ValueError):
    """A users file or variable that cannot be read, worded for the operator."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$<salt hex>$<hash hex>` for a password (a fresh random salt unless given)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=SCRYPT_BYTES, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches a `hash_password` result (constant-time comparison)."""
    try:
        kind, salt, digest = stored.split("$")
        expected = bytes.fromhex(digest)
        salt_bytes = bytes.fromhex(salt)
    except ValueError:
        return False
    if kind != "scrypt":
        return False
    actual = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt_bytes, **SCRYPT)
    return hmac.compare_digest(actual, expected)


@dataclass
class Users:
    """The users allowed in: name -> password hash. `check` is Gradio's `auth` callable."""

    hashes: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def check(self, name: str, password: str) -> bool:
        stored = self.hashes.get(str(name))
        if stored is None:
            verify_password(str(password), hash_password("", b"\0" * 16))  # same time for unknown names
            return False
        return verify_password(str(password), stored)

    @classmethod
    def from_file(cls, path: str | Path) -> "Users":
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AccountsError(f"cannot read the users file {path}: {exc}") from exc
        hashes = {}
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, stored = line.strip().rpartition(":")
            if not _valid_name(name) or not stored.startswith("scrypt$") or stored.count("$") != 2:
                raise AccountsError(f"{path.name}, line {number}: expected 'name:scrypt$salt$hash' (made by "
                                    "`python -m cma_clip.studio.accounts add`)")
            if not STORED_HASH.fullmatch(stored):  # accepted, it refused every password of its user unsaid
                raise AccountsError(f"{path.name}, line {number}: {name}'s hash is not one `python -m "
                                    f"cma_clip.studio.accounts add` makes (scrypt$<salt hex>$<{SCRYPT_BYTES * 2} hex "
                                    f"digits>): add {name} again")
            if name in hashes:
                raise AccountsError(f"{path.name}, line {number}: {name} has a line already (which password "
                                    "holds? keep one)")
            hashes[name] = stored
        if not hashes:
            raise AccountsError(f"the users file {path} names no user")
        return cls(hashes, str(path))

    @classmethod
    def from_pairs(cls, text: str) -> "Users":
        """`name:password,name2:password2` (a password may hold ':' but not ',')."""
        hashes = {}
        for pair in filter(None, (p.strip() for p in text.split(","))):
            name, colon, password = pair.partition(":")
            if not colon or not _valid_name(name) or not password:
                raise AccountsError("CMA_CLIP_AUTH takes 'name:password' pairs separated by commas")
            if name in hashes:
                raise AccountsError(f"CMA_CLIP_AUTH names {name} twice (which password holds? keep one)")
            hashes[name] = hash_password(password)
        if not hashes:
            raise AccountsError("CMA_CLIP_AUTH names no user")
        return cls(hashes, "CMA_CLIP_AUTH")


def _valid_name(name: str) -> bool:
    return (bool(name) and name == name.strip() and len(name) <= MAX_NAME_CHARS and ":" not in name
            and name.isprintable())


@dataclass(frozen=True)
class Login:
    """The app's login: none, passwords (`users`) or Hugging Face OAuth."""

    users: Users | None = None
    oauth: bool = False

    @property
    def on(self) -> bool:
        return self.users is not None or self.oauth


def login_from_env(environ: dict[str, str] | None = None) -> Login:
    """The login the environment asks for (see the module's docstring); none by default."""
    environ = os.environ if environ is None else environ
    if environ.get("CMA_CLIP_USERS") and environ.get("CMA_CLIP_AUTH"):  # one was silently ignored
        raise AccountsError("CMA_CLIP_USERS and CMA_CLIP_AUTH are both set: keep one (the users file holds "
                            "hashed passwords; CMA_CLIP_AUTH plain ones)")
    kind = environ.get("CMA_CLIP_LOGIN", "").strip().lower()
    given = next((name for name in ("CMA_CLIP_USERS", "CMA_CLIP_AUTH") if environ.get(name)), None)
    if given and kind not in ("", "none", "off"):  # the passwords won, the login asked for was ignored unsaid
        raise AccountsError(f"CMA_CLIP_LOGIN={kind!r} and {given} are both set: keep one")
    if environ.get("CMA_CLIP_USERS"):
        return Login(Users.from_file(environ["CMA_CLIP_USERS"]))
    if environ.get("CMA_CLIP_AUTH"):
        return Login(Users.from_pairs(environ["CMA_CLIP_AUTH"]))
    if kind in ("huggingface", "hf", "oauth"):
        if problem := oauth_problem(environ):
            raise AccountsError(f"CMA_CLIP_LOGIN={kind}: {problem}")
        return Login(oauth=True)
    if kind not in ("", "none", "off"):
        raise AccountsError(f"CMA_CLIP_LOGIN={kind!r}: use 'huggingface' (or set CMA_CLIP_USERS or CMA_CLIP_AUTH)")
    return Login()


def oauth_problem(environ: dict[str, str]) -> str | None:
    """Why Hugging Face OAuth cannot sign users in here (Gradio failed with a traceback, or off a Space
    signed everyone in as the token's owner), or None."""
    if not environ.get("SPACE_ID"):
        return ("Hugging Face sign-in works on a Space only (off one, Gradio signs every visitor in as the "
                "owner of this machine's token); use CMA_CLIP_USERS or CMA_CLIP_AUTH here")
    if not environ.get("OAUTH_CLIENT_ID"):
        return "the Space has no OAuth app: add 'hf_oauth: true' to the front matter of its README.md"
    if missing := [name for name in ("authlib", "itsdangerous") if importlib.util.find_spec(name) is None]:
        return (f"Gradio's OAuth needs {' and '.join(missing)}: add '-r requirements-oauth.txt' to "
                "requirements.txt (or pip install -r requirements-oauth.txt)")
    return None


def add_user(path: str | Path, name: str, password: str) -> bool:
    """Add or replace a user in a users file (created if missing, mode 600 from the start);
    True when the user was there and their password is replaced."""
    users = _writable_users(path, name)
    if not password:
        raise AccountsError("the password is empty")
    replaced = name in users
    users[name] = hash_password(password)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as handle:
            handle.write("".join(f"{n}:{h}\n" for n, h in users.items()))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AccountsError(f"cannot write the users file {path}: {exc.strerror or exc}") from exc
    return replaced


def _writable_users(path: str | Path, name: str) -> dict[str, str]:
    """The users already in `path`, once the name and the file are known to be usable (checked
    before a password is asked for)."""
    if not _valid_name(name):
        raise AccountsError(f"a user name is 1 to {MAX_NAME_CHARS} printable characters without ':' or edge spaces")
    path = Path(path)
    if path.is_dir():
        raise AccountsError(f"{path} is a folder: give the users file's path (for example {path / 'users.txt'})")
    if not path.parent.is_dir():
        raise AccountsError(f"no folder {path.parent} for the users file: create it first")
    return Users.from_file(path).hashes if path.exists() and path.read_text().strip() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.studio.accounts",
                                     description="Add a user to a CMA-CLIP Studio users file (CMA_CLIP_USERS), "
                                                 "or replace their password.")
    parser.add_argument("command", choices=["add"])
    parser.add_argument("file")
    parser.add_argument("name")
    args = parser.parse_args(argv)
    try:
        known = args.name in _writable_users(args.file, args.name)
        password = getpass.getpass(f"{'new ' * known}password for {args.name}: ")
        if password != getpass.getpass("again: "):
            raise AccountsError("the passwords differ")
        replaced = add_user(args.file, args.name, password)
    except EOFError:  # no terminal and nothing piped in (a script, a CI job)
        print(f"error: no password given for {args.name}: run it in a terminal, or pipe the password in twice",
              file=sys.stderr)
        return 2
    except AccountsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.name}'s password is replaced" if replaced else f"{args.name} can sign in",
          f"(users file {args.file})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
