"""Ray's fake multi-node provider, except that the node types listed in the provider config's ``refuse`` cannot be
launched: each launch fails as EC2 fails one (Ray's AWS provider turns EC2's error into a ``NodeLaunchException``
with its code and message), so the autoscaler's own failure handling runs. Loaded by the autoscaler of
``services.AutoscalingHead`` as an external provider (``provider: {type: external, module: ...}``)."""
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

CATEGORY = "InsufficientInstanceCapacity"
DESCRIPTION = "We currently do not have sufficient p4d.24xlarge capacity in the Availability Zone you requested."


class RefusingProvider(FakeMultiNodeProvider):
    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        if tags.get(TAG_RAY_USER_NODE_TYPE) in self.provider_config.get("refuse", []):
            raise NodeLaunchException(CATEGORY, DESCRIPTION, src_exc_info=None)
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
