"""Every rendered kustomization (base, overlays, bootstrap) is accepted by the real API server:
server-side apply in dry-run mode validates each field against the real schemas -- Kubernetes'
own and Istio's CRDs' -- and refuses unknown fields, as ``kubectl apply --server-side`` does."""
from __future__ import annotations

import copy

import pytest

from test_manifests import KUSTOMIZATIONS, render


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_the_rendered_manifests_are_accepted_by_the_api_server(kube, path):
    objects = render(path)
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    if namespaces:
        kube.apply(namespaces)  # a dry run cannot create the namespace the other objects need
    out = kube.apply([o for o in objects if o["kind"] != "Namespace"], dry_run=True)
    assert out.count("serverside-applied (server dry run)") == len(objects) - len(namespaces), out


@pytest.mark.parametrize("kind", ["VirtualService", "Deployment"])
def test_a_misspelt_field_is_refused(kube, kind):
    """The check has teeth: one misspelt field, in a CRD object and in a built-in one, is refused."""
    obj = copy.deepcopy(next(o for o in render("base") if o["kind"] == kind))
    obj["spec"]["hostz" if kind == "VirtualService" else "replicaz"] = 1
    with pytest.raises(RuntimeError, match="field not declared in schema"):
        kube.apply([obj], dry_run=True)
