"""store.s3data: the botocore data loader an S3 store's session uses -- botocore's own, with its
endpoint table cut down to the services an S3 store's session can call.

Knows: botocore's data loader and the shape of ``endpoints.json`` (partitions, each with its
regions and a ``services`` map). Must not know: S3 requests, credentials, anything of cssfs.

Why. botocore keeps every JSON file it loads for as long as a client lives: ``endpoints.json``
(1.2 MB of text, the endpoints of every AWS service) costs a mount daemon ~4 MiB of resident
memory for the whole mount, of which the S3 client uses one service's entries. The table is
still parsed once (at client creation); only what no client of this session can ask for is
dropped before botocore caches it. Partitions and their regions stay whole, so region and
partition resolution are unchanged; a service missing from a partition's table resolves to the
partition's default endpoint, as botocore does for any service it has no entry for.
"""

from __future__ import annotations

import os
from typing import Any

import botocore.exceptions
import botocore.loaders
import botocore.session

#: The services an S3 store's session creates clients for: S3 itself, and the credential
#: chain's (assume-role and web identity go to STS, SSO profiles to SSO and SSO-OIDC).
SERVICES = frozenset({"s3", "sts", "sso", "sso-oidc"})


class _LeanFileLoader(botocore.loaders.JSONFileLoader):
    """botocore's JSON loader; an ``endpoints`` file comes back with SERVICES only."""

    def load_file(self, file_path: str) -> Any:
        data = super().load_file(file_path)
        if os.path.basename(file_path) == "endpoints" and isinstance(data, dict):
            for partition in data.get("partitions", ()):
                services = partition.get("services")
                if isinstance(services, dict):
                    partition["services"] = {
                        name: entry for name, entry in services.items() if name in SERVICES
                    }
        return data


def use_lean_loader(session: botocore.session.Session) -> None:
    """Give ``session`` the data loader botocore would make (the same ``data_path`` search
    paths), reading the endpoint table through _LeanFileLoader. Call before creating clients.
    A session whose configuration does not load (a missing profile, a bad config file) keeps
    botocore's loader: creating its client raises that error, where the caller expects it."""
    try:
        data_path = session.get_config_variable("data_path")
    except botocore.exceptions.BotoCoreError:
        return
    loader = botocore.loaders.create_loader(data_path)
    loader.file_loader = _LeanFileLoader()
    session.register_component("data_loader", loader)
