//! A `--model` spec (`HUB`, `NAME=PATH`, `NAME=ARCH:PATH`, `NAME=HUB`; see the
//! module doc of [`super`]) read into a served name and its weights.

use std::path::PathBuf;
use std::str::FromStr;

use super::{check_name, parse_architecture, SpecError, Weights};
use crate::model::ModelName;
use crate::weights::clip;

/// One `--model` spec: a served name and its weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub weights: Weights,
}

impl FromStr for ModelSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let spec = spec.trim();
        let Some((name, rest)) = spec.split_once('=') else {
            let hub = spec
                .parse::<ModelName>()
                .map_err(|_| SpecError::NotHub(clip(spec)))?;
            return Ok(ModelSpec {
                name: spec.to_string(),
                weights: Weights::Hub(hub),
            });
        };
        let (name, rest) = (name.trim(), rest.trim());
        check_name(name)?;
        if rest.is_empty() {
            return Err(SpecError::NoWeights(name.to_string()));
        }
        let weights = if let Ok(hub) = rest.parse::<ModelName>() {
            Weights::Hub(hub)
        } else if let Some((arch, path)) = rest
            .split_once(':')
            .and_then(|(a, p)| Some((parse_architecture(a).ok()?, p)))
        {
            Weights::Path {
                path: PathBuf::from(path),
                architecture: Some(arch),
            }
        } else {
            // A hub name keeps meaning its architecture (`resnet50_swsl=/m/r50.pth`).
            Weights::Path {
                path: PathBuf::from(rest),
                architecture: name.parse::<ModelName>().ok().map(|m| m.architecture),
            }
        };
        Ok(ModelSpec {
            name: name.to_string(),
            weights,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::path;
    use super::*;
    use crate::model::Architecture;

    fn spec(s: &str) -> Result<ModelSpec, SpecError> {
        s.parse()
    }

    #[test]
    fn the_spec_grammar() {
        let r50 = |t| ModelName {
            architecture: Architecture::Resnet50,
            training: t,
        };
        use crate::model::Training::*;
        assert_eq!(
            spec("resnet50_swsl"),
            Ok(ModelSpec {
                name: "resnet50_swsl".into(),
                weights: Weights::Hub(r50(SemiWeaklySupervised))
            })
        );
        // The hub name with a path keeps its architecture (the grammar before names).
        assert_eq!(
            spec("resnet50_swsl=/a/b=c.pth").map(|s| s.weights),
            Ok(path("/a/b=c.pth", Some(Architecture::Resnet50)))
        );
        assert_eq!(
            spec(" resnet50 = /mnt/models ").map(|s| (s.name, s.weights)),
            Ok(("resnet50".into(), path("/mnt/models", None)))
        );
        assert_eq!(
            spec("cats=resnext101_32x8d:/m/x.pth").map(|s| s.weights),
            Ok(path("/m/x.pth", Some(Architecture::Resnext101_32x8d)))
        );
        assert_eq!(
            spec("cats=resnet18_ssl:/m/x.pth").map(|s| s.weights),
            Ok(path("/m/x.pth", Some(Architecture::Resnet18)))
        );
        // Not an architecture before the colon: all of it is the path.
        assert_eq!(
            spec("cats=weights:v2.pth").map(|s| s.weights),
            Ok(path("weights:v2.pth", None))
        );
        assert_eq!(
            spec("resnet50-ssl=resnet50_ssl").map(|s| (s.name, s.weights)),
            Ok(("resnet50-ssl".into(), Weights::Hub(r50(SemiSupervised))))
        );
        assert!(matches!(spec("resnet34_ssl"), Err(SpecError::NotHub(_))));
        assert!(matches!(spec("my-model"), Err(SpecError::NotHub(_))));
        assert!(matches!(
            spec("Cats=/x.pth"),
            Err(SpecError::BadName { .. })
        ));
        assert!(matches!(spec("cats="), Err(SpecError::NoWeights(_))));
        assert!(matches!(spec("=x.pth"), Err(SpecError::BadName { .. })));
    }
}
