//! The models to serve: the `--model` specs merged with the TOML file's `[models.NAME]`
//! tables, each model with its weights and its own settings.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{check_name, parse_architecture, ModelSpec, SpecError, Weights};
use crate::model::ModelName;
use crate::process::device::Precision;
use crate::weights::clip;

/// One model's table in the TOML file (`[models.NAME]`): its weights, and settings that
/// replace the flags' for it alone.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// A checkpoint file or a directory holding one.
    pub path: Option<PathBuf>,
    /// The architecture (or a hub name) `path` holds; told from the file when absent.
    pub arch: Option<String>,
    /// A hub model to serve from the weights cache, when there is no `path`.
    pub hub: Option<String>,
    pub batch_sizes: Option<Vec<usize>>,
    pub max_queue_delay_ms: Option<u64>,
    pub queue_capacity: Option<usize>,
    /// Where this model runs (`cpu`, `cuda`, `cuda:1` ...), as `--device`.
    pub device: Option<String>,
    pub dtype: Option<Precision>,
    pub workers_per_device: Option<usize>,
    pub compute_threads: Option<usize>,
}

impl ModelSettings {
    /// The weights this table names, if it names any.
    fn weights(&self, name: &str) -> Result<Option<Weights>, SpecError> {
        let setting = |what: String| SpecError::Setting {
            name: name.to_string(),
            what,
        };
        let architecture = self
            .arch
            .as_deref()
            .map(parse_architecture)
            .transpose()
            .map_err(|e| setting(format!("arch: {e}")))?;
        match (&self.path, &self.hub) {
            (Some(_), Some(_)) => Err(setting("give `path` or `hub`, not both".into())),
            (Some(path), None) => Ok(Some(Weights::Path {
                path: path.clone(),
                architecture: architecture
                    .or_else(|| name.parse::<ModelName>().ok().map(|m| m.architecture)),
            })),
            (None, Some(hub)) => {
                if architecture.is_some() {
                    return Err(setting(
                        "`arch` goes with `path`; a hub model has its own".into(),
                    ));
                }
                hub.parse::<ModelName>()
                    .map(|h| Some(Weights::Hub(h)))
                    .map_err(|_| setting(format!("hub: {}", SpecError::NotHub(clip(hub)))))
            }
            (None, None) if architecture.is_some() => {
                Err(setting("`arch` needs a `path` to read".into()))
            }
            (None, None) => Ok(None),
        }
    }
}

/// A model to serve: its name, weights and own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub name: String,
    pub weights: Weights,
    pub settings: ModelSettings,
}

/// The models to serve. `specs` are the `--model` specs (command line or environment)
/// and, when they are empty, the file's `model` list; `tables` the file's
/// `[models.NAME]` tables. With `--model` given, those specs are the models served
/// (their weights win over a table's) and the tables only lend settings; otherwise every
/// spec and every table is served. Names must be distinct.
pub fn plan(
    specs: &[String],
    from_command_line: bool,
    tables: &BTreeMap<String, ModelSettings>,
) -> Result<Vec<Planned>, SpecError> {
    let mut out: Vec<Planned> = Vec::new();
    for spec in specs {
        let spec: ModelSpec = spec.parse()?;
        if out.iter().any(|p| p.name == spec.name) {
            return Err(SpecError::Duplicate(spec.name));
        }
        let settings = tables.get(&spec.name).cloned().unwrap_or_default();
        // A table's own weights are checked even where the spec's win.
        settings.weights(&spec.name)?;
        out.push(Planned {
            name: spec.name,
            weights: spec.weights,
            settings,
        });
    }
    for (name, settings) in tables {
        if out.iter().any(|p| &p.name == name) {
            continue;
        }
        check_name(name)?;
        if from_command_line {
            tracing::warn!(model = %name, "[models.{name}] in the config file is not served: --model names the models");
            continue;
        }
        let weights = match settings.weights(name)? {
            Some(w) => w,
            None => Weights::Hub(
                name.parse::<ModelName>()
                    .map_err(|_| SpecError::NoWeights(name.clone()))?,
            ),
        };
        out.push(Planned {
            name: name.clone(),
            weights,
            settings: settings.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::path;
    use super::*;

    fn tables(toml_text: &str) -> Result<BTreeMap<String, ModelSettings>, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn tables_give_weights_and_settings_and_unknown_keys_are_named() {
        let t = tables(
            "[resnet50]\npath = \"/mnt/models\"\nbatch_sizes = [1, 4]\nmax_queue_delay_ms = 3\n\
             queue_capacity = 32\ndevice = \"cpu\"\nworkers_per_device = 2\n\
             [cats]\nhub = \"resnet18_ssl\"\n[resnet18_swsl]\nqueue_capacity = 8\n",
        )
        .expect("parses");
        let planned = plan(&[], false, &t).expect("plan");
        let names: Vec<&str> = planned.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["cats", "resnet18_swsl", "resnet50"]);
        assert_eq!(planned[2].weights, path("/mnt/models", None));
        assert_eq!(planned[2].settings.batch_sizes, Some(vec![1, 4]));
        assert_eq!(planned[2].settings.workers_per_device, Some(2));
        assert!(matches!(planned[0].weights, Weights::Hub(_)));
        assert!(matches!(planned[1].weights, Weights::Hub(_)));

        // --model names what is served; a table with its name lends its settings.
        let planned = plan(&["resnet50=/other.pth".into()], true, &t).expect("plan");
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].weights, path("/other.pth", None));
        assert_eq!(planned[0].settings.queue_capacity, Some(32));

        let err = tables("[m]\npath = \"/x\"\nbatch_size = [1]\n")
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("batch_size"), "names the key: {err}");
        for (text, want) in [
            ("[m]\npath = \"/x\"\nhub = \"resnet18_ssl\"\n", "not both"),
            ("[m]\narch = \"resnet18\"\n", "needs a `path`"),
            (
                "[m]\npath = \"/x\"\narch = \"resnet34\"\n",
                "not an architecture",
            ),
            ("[m]\nhub = \"resnet34_ssl\"\n", "not one of the twelve"),
            ("[m]\nqueue_capacity = 3\n", "has no weights"),
            ("[Bad]\nhub = \"resnet18_ssl\"\n", "lowercase"),
        ] {
            let err = plan(&[], false, &tables(text).expect("parses"))
                .expect_err(text)
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let err = plan(&["a=/x".into(), "a=/y".into()], true, &BTreeMap::new())
            .expect_err("twice")
            .to_string();
        assert!(err.contains("given twice"), "{err}");
    }
}
