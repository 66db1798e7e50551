import torch

from pipeline.models import ClassifierModel, ContrastiveModel, build_encoder


def test_cifar_stem_keeps_resolution_and_standard_stem_downsamples():
    cifar, dim = build_encoder("resnet18", cifar_stem=True)
    standard, _ = build_encoder("resnet18", cifar_stem=False)
    assert dim == 512
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert standard.conv1.kernel_size == (7, 7)
    x = torch.randn(2, 3, 32, 32)
    stem = torch.nn.Sequential(cifar.conv1, cifar.bn1, cifar.relu, cifar.maxpool)
    assert stem(x).shape[-1] == 32


def test_models_output_shapes():
    encoder, dim = build_encoder("small_cnn", width=8)
    contrastive = ContrastiveModel(encoder, dim, 32, 16).eval()
    z = contrastive(torch.randn(4, 3, 32, 32))
    assert z.shape == (4, 16) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    assert contrastive.features(torch.randn(4, 3, 32, 32)).shape == (4, dim)
    classifier = ClassifierModel(*build_encoder("small_cnn", width=8), num_classes=7)
    assert classifier(torch.randn(4, 3, 32, 32)).shape == (4, 7)


def test_the_reference_head_is_linear_relu_linear():
    from pipeline.models import ProjectionHead

    ours, reference = ProjectionHead(8, 6, 4), ProjectionHead(8, 6, 4, batchnorm=False)
    assert [type(m).__name__ for m in ours.net] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in reference.net] == ["Linear", "ReLU", "Linear"]
    assert reference.net[0].bias is not None and ours.net[0].bias is None
