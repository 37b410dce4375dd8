//! Everything a training job reads, resolved and validated before the first step: resource config, hyperparameters,
//! channels and their modes, label maps, and every image/annotation pair.
//!
//! A job that would fail at epoch 7 because one annotation holds label 40 of 21 classes fails here instead, in
//! seconds, with the offending files named. Pipe-mode channels are the exception: reading their FIFO now would consume
//! an epoch, so their configuration is checked here and every example as it streams during training.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::data::annotation::read_annotation;
use crate::data::dataset::{name_some, pair_channel, SamplePair};
use crate::data::epoch_source::EpochSource;
use crate::data::image_io::read_image_dimensions;
use crate::data::label_map::{LabelLut, LabelMaps};
use crate::data::loader::labels_out_of_range;
use crate::data::manifest::{find_manifest, read_manifest, NoRemoteRefs, RemoteRefs, SOURCE_REF};
use crate::data::pipe::{self, PipeChannel};
use crate::model::config::Algorithm;
use crate::sagemaker::channels::{Channel, Channels};
use crate::sagemaker::{ChannelName, Hyperparameters, InputDataConfig, InputMode, MlRoot, ResourceConfig};

/// A validated training job.
#[derive(Debug, Clone)]
pub struct TrainingInputs {
    pub hyperparameters: Hyperparameters,
    pub channels: Channels,
    pub label_maps: LabelMaps,
    pub train: EpochSource,
    pub validation: EpochSource,
}

impl TrainingInputs {
    /// [`Self::prepare_with`] for jobs whose manifests refer to local files only.
    pub fn prepare(ml: &MlRoot) -> Result<Self> {
        Self::prepare_with(ml, &NoRemoteRefs)
    }

    /// Resolve and validate everything; `remote` stages the `s3://` references of File-mode manifests.
    pub fn prepare_with(ml: &MlRoot, remote: &dyn RemoteRefs) -> Result<Self> {
        ResourceConfig::load(&ml.resource_config_file())?.require_single_host()?;
        let hyperparameters = load_hyperparameters(ml)?;
        let config = InputDataConfig::load(&ml.input_data_config_file())?;
        let channels = Channels::resolve(ml, &config)?;
        if !channels.unknown.is_empty() {
            tracing::warn!(channels = ?channels.unknown, "ignoring channels this algorithm does not read");
        }
        for channel in channels.iter() {
            tracing::info!(channel = %channel.name, mode = %channel.mode, path = %channel.path.display(), "channel");
        }
        // Fail on a missing channel before spending time on the other one's contents.
        channels.require(ChannelName::Train)?;
        channels.require(ChannelName::Validation)?;

        let label_maps = LabelMaps::load(channels.get(ChannelName::LabelMap).map(|c| c.path.as_path()))
            .context("the label_map channel is invalid")?;

        let num_classes = hyperparameters.num_classes;
        let mut problems = Vec::new();
        let mut splits = Vec::new();
        for (images, annotations, lut) in [
            (ChannelName::Train, ChannelName::TrainAnnotation, label_maps.train.lut()),
            (
                ChannelName::Validation,
                ChannelName::ValidationAnnotation,
                label_maps.validation.lut(),
            ),
        ] {
            let split = Split {
                ml,
                channels: &channels,
                images,
                annotations,
                num_classes,
            };
            splits.push(split.prepare(lut, remote, &mut problems)?);
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        let validation = splits.pop().context("two splits were prepared")?;
        let train = splits.pop().context("two splits were prepared")?;

        match train.len() {
            Some(n) if hyperparameters.num_training_samples != n as u64 => tracing::warn!(
                "num_training_samples is {} but the train channel has {n} images; the learning-rate schedule follows \
                 num_training_samples",
                hyperparameters.num_training_samples,
            ),
            Some(_) => {}
            None => tracing::info!(
                "the train channel streams in Pipe mode: num_training_samples ({}) sets the learning-rate schedule",
                hyperparameters.num_training_samples
            ),
        }
        require_batches_of_two(&hyperparameters, &train)?;
        let count = |split: &EpochSource| split.len().map_or_else(|| "streamed".to_string(), |n| n.to_string());
        tracing::info!(
            train = %count(&train),
            validation = %count(&validation),
            num_classes,
            "training inputs are valid"
        );
        Ok(Self {
            hyperparameters,
            channels,
            label_maps,
            train,
            validation,
        })
    }

    /// Training examples per epoch: the train channel's in File mode; num_training_samples in Pipe mode, where a
    /// stream's length is known only once it has been read.
    pub fn train_examples(&self) -> usize {
        self.train
            .len()
            .unwrap_or(self.hyperparameters.num_training_samples as usize)
    }
}

/// PSPNet's and DeepLabV3's pooled branches average each image to 1×1, and BatchNorm in training needs at least two
/// values per channel: such a job would fail at its first step. Training batches are `mini_batch_size` images, or
/// the whole train channel when it has fewer (the incomplete last batch is dropped).
fn require_batches_of_two(hp: &Hyperparameters, train: &EpochSource) -> Result<()> {
    let examples = train.len().unwrap_or(hp.num_training_samples as usize);
    let batch = (hp.mini_batch_size as usize).min(examples);
    if batch >= 2 || hp.algorithm == Algorithm::Fcn {
        return Ok(());
    }
    bail!(
        "algorithm={} cannot train on batches of one image (mini_batch_size {}, {examples} training image(s)): its \
         pooling branch averages each image to 1×1, and BatchNorm in training needs at least two values per channel; \
         set mini_batch_size to 2 or more with at least 2 training images, or use algorithm=fcn",
        hp.algorithm,
        hp.mini_batch_size
    )
}

/// One split's channels: the images channel and the annotation channel that goes with it in File mode.
struct Split<'a> {
    ml: &'a MlRoot,
    channels: &'a Channels,
    images: ChannelName,
    annotations: ChannelName,
    num_classes: u32,
}

impl Split<'_> {
    /// A Pipe-mode stream, a File-mode manifest, or File-mode image and annotation channels paired by stem. The
    /// contents of File-mode splits are checked now; their problems are added to `problems`.
    fn prepare(&self, lut: LabelLut, remote: &dyn RemoteRefs, problems: &mut Vec<String>) -> Result<EpochSource> {
        let channel = self.channels.require(self.images)?;
        let attributes = manifest_attributes(channel)?;
        if channel.mode == InputMode::Pipe {
            return self.pipe(channel, attributes, lut);
        }
        let (pairs, checked_in) = match find_manifest(channel.name.as_str(), &channel.path)? {
            Some(manifest) => {
                let pairs = read_manifest(&manifest, &channel.path, attributes.as_ref(), remote)?;
                tracing::info!(
                    channel = %self.images,
                    examples = pairs.len(),
                    "reading the augmented manifest {}",
                    manifest.display()
                );
                let name = manifest.file_name().unwrap_or_default().to_string_lossy().into_owned();
                (pairs, name)
            }
            None => (self.paired()?, self.annotations.as_str().to_string()),
        };
        problems.extend(check_contents(&checked_in, &pairs, &lut, self.num_classes));
        Ok(EpochSource::files(pairs, lut))
    }

    fn pipe(&self, channel: &Channel, attributes: Option<[String; 2]>, lut: LabelLut) -> Result<EpochSource> {
        let wrapper = channel.record_wrapper_type.as_deref().unwrap_or("RecordIO");
        if !wrapper.eq_ignore_ascii_case("RecordIO") {
            bail!(
                "channel '{}' is in Pipe mode with RecordWrapperType '{wrapper}'; this algorithm streams augmented \
                 manifests, which need RecordWrapperType RecordIO (ContentType application/x-recordio)",
                channel.name
            );
        }
        if let Some(content_type) = channel.content_type.as_deref() {
            if !content_type.eq_ignore_ascii_case("application/x-recordio") {
                tracing::warn!(
                    "channel '{}' is in Pipe mode with ContentType '{content_type}'; reading it as an augmented \
                     manifest (application/x-recordio): two RecordIO records per line, the image then the annotation",
                    channel.name
                );
            }
        }
        if self.channels.get(self.annotations).is_some() {
            tracing::warn!(
                "ignoring channel '{}': in Pipe mode channel '{}' streams each annotation after its image",
                self.annotations,
                self.images
            );
        }
        let wait = pipe::wait_from_env().map_err(anyhow::Error::msg)?;
        let shuffle_buffer = pipe::shuffle_buffer_from_env().map_err(anyhow::Error::msg)?;
        tracing::info!(
            "channel '{}' is in Pipe mode: skipping its content checks (reading its FIFO now would consume an \
             epoch); each example is checked as it streams during training",
            self.images
        );
        let attributes = attributes.unwrap_or_else(|| [SOURCE_REF.to_string(), "annotation".to_string()]);
        let channel = PipeChannel::new(self.ml, self.images.as_str(), attributes, wait, shuffle_buffer);
        Ok(EpochSource::pipe(channel, lut, self.num_classes))
    }

    /// File-mode image and annotation channels, paired by stem.
    fn paired(&self) -> Result<Vec<SamplePair>> {
        let images = self.channels.require(self.images)?;
        let annotations = self.channels.require(self.annotations)?;
        let (pairs, report) = pair_channel(
            images.name.as_str(),
            &images.path,
            annotations.name.as_str(),
            &annotations.path,
        )?;
        if !report.ignored_files.is_empty() {
            tracing::warn!(
                "ignoring {} files that are not images or annotations in channels '{}'/'{}': {}",
                report.ignored_files.len(),
                images.name,
                annotations.name,
                name_some(&report.ignored_files)
            );
        }
        Ok(pairs)
    }
}

/// The channel's AttributeNames as (image, annotation), when it has them.
fn manifest_attributes(channel: &Channel) -> Result<Option<[String; 2]>> {
    match channel.attribute_names.as_deref() {
        None => Ok(None),
        Some([image, annotation]) => Ok(Some([image.clone(), annotation.clone()])),
        Some(names) => bail!(
            "channel '{}' has AttributeNames {names:?}; an augmented manifest for segmentation names two attributes, \
             the image's then the annotation's, such as [\"source-ref\", \"city-streets-ref\"]",
            channel.name
        ),
    }
}

fn load_hyperparameters(ml: &MlRoot) -> Result<Hyperparameters> {
    let path = ml.hyperparameters_file();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} does not exist; the job needs at least the hyperparameters num_classes and num_training_samples",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let (hyperparameters, notes) = Hyperparameters::from_json(&text)?;
    for name in &notes.ignored_reserved {
        tracing::info!("ignoring platform hyperparameter '{name}'");
    }
    tracing::info!(?hyperparameters, "hyperparameters");
    Ok(hyperparameters)
}

/// What one pair's check found.
enum Finding {
    Fine,
    Unreadable(String),
    SizeMismatch(String),
    Unmapped(String),
    OutOfRange { file: String, labels: Vec<u8> },
}

/// Decode every annotation (and read every image's header), apply the label map and check sizes and label values.
/// Returns one message per kind of problem, naming the first few files and the count.
fn check_contents(annotation_channel: &str, pairs: &[SamplePair], lut: &LabelLut, num_classes: u32) -> Vec<String> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let chunk = pairs.len().div_ceil(workers).max(1);
    let findings: Vec<Finding> = std::thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|p| check_pair(p, lut, num_classes)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });

    let (mut unreadable, mut sizes, mut unmapped, mut out_of_range) = (vec![], vec![], vec![], vec![]);
    let mut bad_labels = [false; 256];
    for finding in findings {
        match finding {
            Finding::Fine => {}
            Finding::Unreadable(m) => unreadable.push(m),
            Finding::SizeMismatch(m) => sizes.push(m),
            Finding::Unmapped(m) => unmapped.push(m),
            Finding::OutOfRange { file, labels } => {
                labels.iter().for_each(|&l| bad_labels[usize::from(l)] = true);
                out_of_range.push(file);
            }
        }
    }
    let mut problems = Vec::new();
    if !unreadable.is_empty() {
        problems.push(format!(
            "{} files cannot be read: {}",
            unreadable.len(),
            name_some(&unreadable)
        ));
    }
    if !sizes.is_empty() {
        problems.push(format!(
            "{} image/annotation pairs differ in size (an annotation must have its image's width and height): {}",
            sizes.len(),
            name_some(&sizes)
        ));
    }
    if !unmapped.is_empty() {
        problems.push(format!(
            "{} annotations in '{annotation_channel}' hold pixel values the label map does not map: {}; add them to \
             the label map or fix the annotations",
            unmapped.len(),
            name_some(&unmapped)
        ));
    }
    if !out_of_range.is_empty() {
        let labels: Vec<String> = (0..=255u8)
            .filter(|&l| bad_labels[usize::from(l)])
            .map(|l| l.to_string())
            .collect();
        problems.push(format!(
            "{} annotations in '{annotation_channel}' hold labels >= num_classes ({num_classes}) that are not 255 \
             (ignore): labels {} in {}; raise num_classes, fix the annotations or add a label_map channel",
            out_of_range.len(),
            labels.join(", "),
            name_some(&out_of_range)
        ));
    }
    problems
}

fn check_pair(pair: &SamplePair, lut: &LabelLut, num_classes: u32) -> Finding {
    let image_size = match read_image_dimensions(&pair.image) {
        Ok(size) => size,
        Err(e) => return Finding::Unreadable(e.to_string()),
    };
    let mut labels = match read_annotation(&pair.annotation) {
        Ok(labels) => labels,
        Err(e) => return Finding::Unreadable(e.to_string()),
    };
    let annotation_name = file_name(&pair.annotation);
    if labels.dimensions() != image_size {
        return Finding::SizeMismatch(format!(
            "{} is {}x{} but {annotation_name} is {}x{}",
            file_name(&pair.image),
            image_size.0,
            image_size.1,
            labels.width(),
            labels.height()
        ));
    }
    if let Err(unmapped) = lut.apply(&mut labels) {
        return Finding::Unmapped(format!("{annotation_name} ({unmapped})"));
    }
    let bad = labels_out_of_range(&labels, num_classes);
    if bad.is_empty() {
        Finding::Fine
    } else {
        Finding::OutOfRange {
            file: annotation_name,
            labels: bad,
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}
