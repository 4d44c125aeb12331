"""The `telemetry:` section and the OTEL_* variables: one resolution order, readable errors."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, Settings, parse_settings
from gateway.config.telemetry import ENVIRONMENT


def parse(telemetry: dict[str, Any] | None = None, **environ: str) -> Settings:
    config: dict[str, Any] = {} if telemetry is None else {"telemetry": telemetry}
    return parse_settings(yaml.safe_dump(config), "gateway.yaml", environ=environ)


def problems(telemetry: dict[str, Any] | None = None, **environ: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(telemetry, **environ)
    return caught.value.errors


def test_off_unless_an_endpoint_is_configured() -> None:
    assert not parse().telemetry.active
    assert not parse({"service_name": "gw"}, OTEL_TRACES_SAMPLER="always_on").telemetry.active


def test_the_standard_variables_turn_it_on() -> None:
    telemetry = parse(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318/",
        OTEL_SERVICE_NAME="images",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.25",
        OTEL_BSP_MAX_QUEUE_SIZE="100",
    ).telemetry
    assert telemetry.active
    assert telemetry.url == "http://collector:4318/v1/traces"  # the signal's path appended
    assert (telemetry.service_name, telemetry.sampler, telemetry.sampler_arg) == (
        "images",
        "parentbased_traceidratio",
        0.25,
    )
    assert telemetry.max_queue_size == 100


def test_the_traces_endpoint_is_used_as_it_is_and_wins_over_the_generic_one() -> None:
    telemetry = parse(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://generic:4318",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://traces:9999/custom",
    ).telemetry
    assert telemetry.url == "http://traces:9999/custom"


def test_the_section_wins_over_the_environment() -> None:
    telemetry = parse(
        {"endpoint": "http://file:4318", "sampler": "always_on", "service_name": "from-file"},
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://env:4318/v1/traces",
        OTEL_TRACES_SAMPLER="always_off",
        OTEL_SERVICE_NAME="from-env",
        OTEL_TRACES_SAMPLER_ARG="0.5",
    ).telemetry
    # An endpoint written in the file stands for both: the environment's traces endpoint is not used.
    assert telemetry.url == "http://file:4318/v1/traces"
    assert (telemetry.sampler, telemetry.service_name) == ("always_on", "from-file")
    assert telemetry.sampler_arg == 0.5  # not written in the file: from the environment


def test_disabled_by_the_sdk_variable_or_the_section() -> None:
    assert not parse(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318", OTEL_SDK_DISABLED="true").telemetry.active
    assert not parse({"endpoint": "http://c:4318", "enabled": False}).telemetry.active
    assert parse({"endpoint": "http://c:4318", "enabled": True}, OTEL_SDK_DISABLED="true").telemetry.active


def test_a_bad_variable_is_named() -> None:
    assert problems(OTEL_TRACES_SAMPLER="sometimes", OTEL_TRACES_SAMPLER_ARG="2") == [
        "OTEL_TRACES_SAMPLER: Input should be 'always_on', 'always_off', 'traceidratio',"
        " 'parentbased_always_on', 'parentbased_always_off' or 'parentbased_traceidratio'"
        " (for telemetry.sampler, got 'sometimes')",
        "OTEL_TRACES_SAMPLER_ARG: Input should be less than or equal to 1"
        " (for telemetry.sampler_arg, got '2')",
    ]


def test_a_bad_section_is_reported_with_its_key_path() -> None:
    assert problems({"endpoint": "collector:4318", "protocl": "grpc"}) == [
        "telemetry.endpoint: must be an http:// or https:// URL, got 'collector:4318'",
        "telemetry.protocl: Extra inputs are not permitted",
    ]


def test_grpc_needs_its_exporter_package() -> None:
    (problem,) = problems(OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert problem.startswith("OTEL_EXPORTER_OTLP_PROTOCOL: grpc needs the")


def test_every_variable_names_a_field() -> None:
    assert set(ENVIRONMENT) <= set(Settings.model_fields["telemetry"].annotation.model_fields)  # type: ignore[union-attr]


def test_a_section_of_comments_only_leaves_the_environment_in_charge() -> None:
    text = "telemetry:\n  # endpoint: http://127.0.0.1:4318\n"
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert (
        parse_settings(text, "gateway.yaml", environ=environ).telemetry.url
        == "http://collector:4318/v1/traces"
    )
    assert not parse_settings(text, "gateway.yaml", environ={}).telemetry.active


def test_the_user_hash_key_comes_from_an_environment_variable_and_empty_is_unset() -> None:
    """As config.example.yaml writes it: `user_hash_key: ${GATEWAY_TRACE_USER_KEY:-}`."""
    text = "telemetry:\n  user_hash_key: ${GATEWAY_TRACE_USER_KEY:-}\n"
    telemetry = parse_settings(text, "gateway.yaml", environ={"GATEWAY_TRACE_USER_KEY": "k3y"}).telemetry
    assert telemetry.user_hash_key is not None and telemetry.user_hash_key.get_secret_value() == "k3y"
    assert "k3y" not in repr(telemetry)
    assert parse_settings(text, "gateway.yaml", environ={}).telemetry.user_hash_key is None
