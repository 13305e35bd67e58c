"""store.s3data: the S3 store's botocore session keeps only the endpoints it can use, and
resolves them as a stock session does. No network: clients are only created."""

from __future__ import annotations

import botocore.exceptions
import botocore.session
import pytest

from cssfs.store.s3data import SERVICES, use_lean_loader


@pytest.fixture(autouse=True)
def _no_endpoint_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_STS",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def _lean() -> botocore.session.Session:
    session = botocore.session.Session()
    use_lean_loader(session)
    return session


def test_the_endpoint_table_keeps_only_the_store_services() -> None:
    stock = botocore.session.Session().get_component("data_loader").load_data("endpoints")
    lean = _lean().get_component("data_loader").load_data("endpoints")
    assert [p["partition"] for p in lean["partitions"]] == [
        p["partition"] for p in stock["partitions"]
    ]
    for full, cut in zip(stock["partitions"], lean["partitions"], strict=True):
        assert cut["regions"] == full["regions"]
        assert set(cut["services"]) == SERVICES & set(full["services"])
    assert "s3" in lean["partitions"][0]["services"]


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"])
@pytest.mark.parametrize("service", ["s3", "sts"])
def test_clients_resolve_as_with_the_stock_table(region: str, service: str) -> None:
    def endpoint(session: botocore.session.Session) -> tuple[str, str | None]:
        client = session.create_client(service, region_name=region)
        return client.meta.endpoint_url, client.meta.region_name

    assert endpoint(_lean()) == endpoint(botocore.session.Session())


def test_a_session_whose_profile_is_missing_fails_where_it_did() -> None:
    session = botocore.session.Session(profile="no-such-profile-cssfs")
    use_lean_loader(session)  # botocore's loader stays; creating the client says why
    with pytest.raises(botocore.exceptions.ProfileNotFound):
        session.create_client("s3", region_name="us-east-1")
