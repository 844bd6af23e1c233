//! Where the models run — the server's devices, precision and workers, and a model's
//! own from its `[models.NAME]` table — which models are served, and the loader that
//! reads their weights onto their devices once the server listens.

use std::sync::Arc;

use anyhow::Context;

use super::flags::ServeArgs;
use resnet_serve::process::device::{self, DeviceSpec};
use resnet_serve::process::models;
use resnet_serve::process::placement::Placement;
use resnet_serve::process::server::{ModelLoader, ServeOptions};
use resnet_serve::scheduler::Backend;
use resnet_serve::weights::download::Downloader;

/// The models to serve (see [`models::plan`]): resnet50_swsl when nothing names any.
pub(super) fn planned_models(args: &ServeArgs) -> anyhow::Result<Vec<models::Planned>> {
    let planned = models::plan(
        &args.models,
        args.models_from_command_line,
        &args.model_tables,
    )?;
    if !planned.is_empty() {
        return Ok(planned);
    }
    Ok(models::plan(
        &["resnet50_swsl".into()],
        true,
        &args.model_tables,
    )?)
}

/// Where models without settings of their own run: the flags' device, dtype, workers and
/// threads, warmed at the server's batch sizes.
pub(super) fn server_placement(
    args: &ServeArgs,
    options: &ServeOptions,
) -> anyhow::Result<Arc<Placement>> {
    let device_spec: DeviceSpec = args.device.as_deref().unwrap_or("auto").parse()?;
    let precision = args.dtype.unwrap_or_default();
    // Checked before listening, so a bad --device fails at once rather than after bind.
    let devices = device::resolve(&device_spec, precision)?;
    let on_gpu = devices.iter().any(|d| !d.is_cpu());
    let workers = args
        .workers_per_device
        .unwrap_or(if on_gpu { 2 } else { 1 });
    if workers == 0 {
        anyhow::bail!("--workers-per-device must be at least 1");
    }
    let warm_sizes = options.policy.allowed_sizes().to_vec();
    let cache = Downloader::from_env(args.cache_dir.clone(), None);
    let place = Arc::new(Placement {
        devices,
        precision,
        workers,
        warm_sizes,
        cache,
        compute_threads: args.compute_threads,
    });
    Ok(place)
}

/// Each model with its placement, checked (devices resolved) before anything listens.
pub(super) fn place_models(
    models: Vec<models::Planned>,
    place: &Arc<Placement>,
    args: &ServeArgs,
    options: &ServeOptions,
) -> anyhow::Result<Vec<(models::Planned, Arc<Placement>)>> {
    let mut loads: Vec<(models::Planned, Arc<Placement>)> = Vec::new();
    for planned in models {
        let s = &planned.settings;
        let own_policy = options.model_policies.get(&planned.name);
        let placed = if own_policy.is_none()
            && s.device.is_none()
            && s.dtype.is_none()
            && s.workers_per_device.is_none()
            && s.compute_threads.is_none()
        {
            place.clone()
        } else {
            let warm = own_policy.unwrap_or(&options.policy).allowed_sizes();
            Arc::new(model_placement(&planned, place, args, warm)?)
        };
        loads.push((planned, placed));
    }
    Ok(loads)
}

/// Where a model with settings of its own runs: its table's device, dtype, workers and
/// threads, the server's for the rest.
fn model_placement(
    planned: &models::Planned,
    server: &Placement,
    args: &ServeArgs,
    warm_sizes: &[usize],
) -> anyhow::Result<Placement> {
    let s = &planned.settings;
    let context = || format!("[models.{}]", planned.name);
    let precision = s.dtype.unwrap_or(server.precision);
    let devices = if s.device.is_none() && s.dtype.is_none() {
        server.devices.clone()
    } else {
        let spec: DeviceSpec = s
            .device
            .as_deref()
            .or(args.device.as_deref())
            .unwrap_or("auto")
            .parse()
            .with_context(context)?;
        device::resolve(&spec, precision).with_context(context)?
    };
    let on_gpu = devices.iter().any(|d| !d.is_cpu());
    let workers = s
        .workers_per_device
        .or(args.workers_per_device)
        .unwrap_or(if on_gpu { 2 } else { 1 });
    if workers == 0 {
        anyhow::bail!("{}: workers_per_device must be at least 1", context());
    }
    Ok(Placement {
        devices,
        precision,
        workers,
        warm_sizes: warm_sizes.to_vec(),
        cache: server.cache.clone(),
        compute_threads: s.compute_threads.or(server.compute_threads),
    })
}

/// Reads every model's weights onto its devices, one replica per worker (run by the
/// server once it listens).
pub(super) fn loader(loads: Vec<(models::Planned, Arc<Placement>)>) -> ModelLoader {
    Box::new(move || {
        let mut out: Vec<(String, Arc<dyn Backend>)> = Vec::new();
        for (planned, place) in loads {
            let replicas = place
                .load_weights(&planned.name, &planned.weights)
                .map_err(|e| format!("model '{}': {e}", planned.name))?;
            for replica in replicas {
                out.push((planned.name.clone(), replica));
            }
        }
        Ok(out)
    })
}
