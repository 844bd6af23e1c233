//! The six architectures behind the twelve torch.hub names, and the names themselves.

use std::fmt;
use std::str::FromStr;

/// Which residual block a network stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Two 3x3 convolutions (resnet18); expansion 1.
    Basic,
    /// 1x1, grouped 3x3 (carrying the stride), 1x1; expansion 4.
    Bottleneck,
}

impl Block {
    /// Output channels of a block relative to its `planes`.
    pub fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// One of the six torchvision `ResNet` configurations the hub models use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Resnet18,
    Resnet50,
    Resnext50_32x4d,
    Resnext101_32x4d,
    Resnext101_32x8d,
    Resnext101_32x16d,
}

impl Architecture {
    pub const ALL: [Architecture; 6] = [
        Architecture::Resnet18,
        Architecture::Resnet50,
        Architecture::Resnext50_32x4d,
        Architecture::Resnext101_32x4d,
        Architecture::Resnext101_32x8d,
        Architecture::Resnext101_32x16d,
    ];

    /// torchvision's name for the architecture.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Resnet18 => "resnet18",
            Architecture::Resnet50 => "resnet50",
            Architecture::Resnext50_32x4d => "resnext50_32x4d",
            Architecture::Resnext101_32x4d => "resnext101_32x4d",
            Architecture::Resnext101_32x8d => "resnext101_32x8d",
            Architecture::Resnext101_32x16d => "resnext101_32x16d",
        }
    }

    pub fn block(self) -> Block {
        match self {
            Architecture::Resnet18 => Block::Basic,
            _ => Block::Bottleneck,
        }
    }

    /// Blocks per stage (`layer1`..`layer4`).
    pub fn layers(self) -> [usize; 4] {
        match self {
            Architecture::Resnet18 => [2, 2, 2, 2],
            Architecture::Resnet50 | Architecture::Resnext50_32x4d => [3, 4, 6, 3],
            _ => [3, 4, 23, 3],
        }
    }

    /// Convolution groups of the bottleneck's 3x3 convolution.
    pub fn groups(self) -> usize {
        match self {
            Architecture::Resnet18 | Architecture::Resnet50 => 1,
            _ => 32,
        }
    }

    /// torchvision's `width_per_group`.
    pub fn width_per_group(self) -> usize {
        match self {
            Architecture::Resnet18 | Architecture::Resnet50 => 64,
            Architecture::Resnext50_32x4d | Architecture::Resnext101_32x4d => 4,
            Architecture::Resnext101_32x8d => 8,
            Architecture::Resnext101_32x16d => 16,
        }
    }

    /// Channels entering the classifier (`fc.in_features`).
    pub fn feature_dim(self) -> usize {
        512 * self.block().expansion()
    }

    /// Recognise an architecture from a state dict's key -> shape map, by the shapes
    /// that tell them apart (block kind, depth of `layer3`, width of the grouped conv).
    pub fn detect(shape_of: impl Fn(&str) -> Option<Vec<usize>>) -> Option<Architecture> {
        if shape_of("layer1.0.conv3.weight").is_none() {
            return shape_of("layer1.0.conv1.weight").map(|_| Architecture::Resnet18);
        }
        let deep = shape_of("layer3.22.conv1.weight").is_some();
        // conv2 of layer1's first block: [width, width / groups, 3, 3].
        let conv2 = shape_of("layer1.0.conv2.weight")?;
        let (width, per_group) = (*conv2.first()?, *conv2.get(1)?);
        Architecture::ALL.into_iter().find(|a| {
            let groups = a.groups();
            let w = 64 * a.width_per_group() / 64 * groups;
            a.block() == Block::Bottleneck
                && (a.layers()[2] == 23) == deep
                && w == width
                && w / groups == per_group
        })
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the published weights were trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Training {
    /// Semi-supervised on YFCC100M (`_ssl`).
    SemiSupervised,
    /// Semi-weakly supervised on 940M Instagram images (`_swsl`).
    SemiWeaklySupervised,
}

/// One of the twelve torch.hub model names, e.g. `resnext101_32x8d_swsl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelName {
    pub architecture: Architecture,
    pub training: Training,
}

/// The name is not one of the twelve hub models.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown model '{0}': expected one of {list}", list = ModelName::all().map(|m| m.to_string()).collect::<Vec<_>>().join(", "))]
pub struct UnknownModel(pub String);

impl ModelName {
    /// All twelve, in the model card's order.
    pub fn all() -> impl Iterator<Item = ModelName> {
        Architecture::ALL.into_iter().flat_map(|architecture| {
            [Training::SemiSupervised, Training::SemiWeaklySupervised]
                .into_iter()
                .map(move |training| ModelName {
                    architecture,
                    training,
                })
        })
    }

    /// The published checkpoint's file name (`<stem>-<sha256 prefix>.pth`).
    pub fn hub_file_name(self) -> &'static str {
        use Architecture::*;
        use Training::*;
        match (self.training, self.architecture) {
            (SemiSupervised, Resnet18) => "semi_supervised_resnet18-d92f0530.pth",
            (SemiSupervised, Resnet50) => "semi_supervised_resnet50-08389792.pth",
            (SemiSupervised, Resnext50_32x4d) => "semi_supervised_resnext50_32x4-ddb3e555.pth",
            (SemiSupervised, Resnext101_32x4d) => "semi_supervised_resnext101_32x4-dc43570a.pth",
            (SemiSupervised, Resnext101_32x8d) => "semi_supervised_resnext101_32x8-2cfe2f8b.pth",
            (SemiSupervised, Resnext101_32x16d) => "semi_supervised_resnext101_32x16-15fffa57.pth",
            (SemiWeaklySupervised, Resnet18) => "semi_weakly_supervised_resnet18-118f1556.pth",
            (SemiWeaklySupervised, Resnet50) => "semi_weakly_supervised_resnet50-16a12f1b.pth",
            (SemiWeaklySupervised, Resnext50_32x4d) => {
                "semi_weakly_supervised_resnext50_32x4-72679e44.pth"
            }
            (SemiWeaklySupervised, Resnext101_32x4d) => {
                "semi_weakly_supervised_resnext101_32x4-3f87e46b.pth"
            }
            (SemiWeaklySupervised, Resnext101_32x8d) => {
                "semi_weakly_supervised_resnext101_32x8-b4712904.pth"
            }
            (SemiWeaklySupervised, Resnext101_32x16d) => {
                "semi_weakly_supervised_resnext101_32x16-f3559a9c.pth"
            }
        }
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let suffix = match self.training {
            Training::SemiSupervised => "ssl",
            Training::SemiWeaklySupervised => "swsl",
        };
        write!(f, "{}_{suffix}", self.architecture)
    }
}

impl FromStr for ModelName {
    type Err = UnknownModel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelName::all()
            .find(|m| m.to_string() == s)
            .ok_or_else(|| UnknownModel(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twelve_names_round_trip() {
        let names: Vec<String> = ModelName::all().map(|m| m.to_string()).collect();
        assert_eq!(names.len(), 12);
        assert!(names.contains(&"resnext101_32x16d_ssl".to_string()));
        assert!(names.contains(&"resnet18_swsl".to_string()));
        for n in &names {
            assert_eq!(
                &n.parse::<ModelName>().map(|m| m.to_string()).ok(),
                &Some(n.clone())
            );
        }
        let err = "resnet34_ssl"
            .parse::<ModelName>()
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("resnet34_ssl") && e.contains("resnet50_swsl")));
    }

    #[test]
    fn hub_file_names_are_distinct_and_match_training() {
        let files: std::collections::HashSet<_> =
            ModelName::all().map(|m| m.hub_file_name()).collect();
        assert_eq!(files.len(), 12);
        for m in ModelName::all() {
            let weak = m.hub_file_name().starts_with("semi_weakly");
            assert_eq!(weak, m.training == Training::SemiWeaklySupervised, "{m}");
        }
    }

    #[test]
    fn widths_match_torchvision() {
        // torchvision: width = int(planes * width_per_group / 64) * groups, planes = 64.
        let w = |a: Architecture| 64 * a.width_per_group() / 64 * a.groups();
        assert_eq!(w(Architecture::Resnet50), 64);
        assert_eq!(w(Architecture::Resnext50_32x4d), 128);
        assert_eq!(w(Architecture::Resnext101_32x8d), 256);
        assert_eq!(w(Architecture::Resnext101_32x16d), 512);
    }
}
